"""benchmarks/evidence.py's plan when the step's breakdown runs out of its limit: on the
H200 of 2026-12-04 it was cut before timing anything and the plan fell back to another
machine's rate. The breakdown now writes each batch as it is timed; what finished is used."""

import argparse
import importlib.util
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def _evidence():
  sys.path.insert(0, str(REPO / "benchmarks"))
  spec = importlib.util.spec_from_file_location("emim_evidence", REPO / "benchmarks" / "evidence.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _args(tmp_path, **kw):
  base = dict(out=str(tmp_path), config="configs/cifar10.py", batch=256, breakdown_steps=20, breakdown_limit_s=130.0,
              no_breakdown=False, rate_from=str(tmp_path / "none.json"), fallback_pairs_per_s=17962.0, epochs=0,
              max_epochs=400, methods=["emmi", "barlow_twins", "byol"], train_examples=50000)
  return argparse.Namespace(**{**base, **kw})


def test_a_breakdown_cut_after_the_runs_batch_still_sets_the_plan(tmp_path, monkeypatch):
  evidence = _evidence()
  calls = []

  def cut_after_first_batch(cmd, log, env, limit):
    calls.append((cmd, limit))
    out = pathlib.Path(next(c for c in cmd if c.startswith("--out=")).split("=", 1)[1])
    out.mkdir(parents=True)
    # What step_breakdown.py has written once batch 256 is timed and 512 is not.
    (out / "breakdown.json").write_text(json.dumps({"pairs_per_s": {"256": {"per_view": 20000.0, "fused": 22000.0}}}))
    return -15  # ended by the limit's SIGTERM

  monkeypatch.setattr(evidence, "run_logged", cut_after_first_batch)
  clock = evidence.Clock(510.0)
  args = _args(tmp_path)
  report = evidence.breakdown(args, clock, {})
  cmd, limit = calls[0]
  assert cmd[cmd.index("--batch") + 1:cmd.index("--batch") + 3] == ["256", "512"]  # the runs' batch first
  assert limit == 130.0
  setup = evidence.plan(args, clock, report)
  assert setup["rate_from"] == "the breakdown"
  assert setup["pairs_per_s_one_process"] == 22000.0 and setup["fused_views"] is True  # fused > 1.03 x per view


def test_nothing_timed_falls_back_and_says_so(tmp_path, monkeypatch, capsys):
  evidence = _evidence()
  monkeypatch.setattr(evidence, "run_logged", lambda cmd, log, env, limit: -15)
  clock = evidence.Clock(510.0)
  args = _args(tmp_path)
  report = evidence.breakdown(args, clock, {})
  assert "batches timed: none" in capsys.readouterr().out
  setup = evidence.plan(args, clock, report)
  assert setup["rate_from"].startswith("--fallback_pairs_per_s") and setup["pairs_per_s_one_process"] == 17962.0


def test_a_runs_row_carries_the_device_memory_its_process_held(tmp_path):
  """emim.train writes the peak device memory into timings.json on a GPU or TPU; the
  evidence table shows it beside the run's figures (the measured counterpart of emim.aot)."""
  evidence = _evidence()
  rows = [{"step": s, "pairs_per_s": 1000.0 * s} for s in (10, 20, 30)]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (tmp_path / "evaluation.json").write_text(json.dumps({"30": {"step": 30, "knn_top1_k20": 0.5, "linear_top1": 0.6}}))
  (tmp_path / "timings.json").write_text(json.dumps({"train_s": 9.0, "peak_device_memory_gib": 1.234}))
  row = evidence.summarize("emmi", tmp_path, 10, 0, 9.0, 2.0)
  assert row["peak_device_memory_gib"] == 1.234 and row["pairs_per_s"] == 25000.0 and row["linear_top1"] == 60.0
  setup = {"config": "configs/cifar10.py", "batch": 256, "epochs": 3, "fused_views": False, "probe_epochs": 10,
           "rate_from": "the breakdown", "pairs_per_s_one_process": 30000.0}
  table = evidence.table({"emmi": row}, setup, {"device": "an H200"})
  assert "| eval wall s | peak device GiB (training) |" in table and "| 9 | 2 | 1.234 |" in table
  (tmp_path / "timings.json").write_text("{half")  # a run cut while writing it: no figure, no crash
  assert evidence.summarize("emmi", tmp_path, 10, 0, 9.0, 2.0)["peak_device_memory_gib"] is None
