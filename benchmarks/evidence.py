"""The project's headline figures in one lease: the CIFAR-10 step's cost, then EMMI,
Barlow Twins and BYOL trained for the same number of epochs, each evaluated the same way,
beside the untrained network (issue 20).

    python benchmarks/evidence.py --data=.accel/cifar10-jpeg.tar.gz --out=$OUT --budget_s=510
    python benchmarks/evidence.py --smoke --out=/tmp/evidence        # the script's CPU check

Inside ``--budget_s`` seconds (its own limits inside: whatever happens it writes what it
has):

1. ``step_breakdown.py --parts whole`` at batch 256 and 512: one process's pairs/s of the
   loop's program, with a forward per view and with the views fused. The faster form at
   the runs' batch (256) is the one the runs use, and its rate sets the epochs.
   Meanwhile the dataset is decoded once into the cache the runs share.
2. The methods trained side by side on the one accelerator, each process with its share
   of the memory, for E epochs each: as many as fit the time left at the breakdown's rate
   (the learning-rate schedule is that of an E-epoch run, warm-up E/10, never a truncated
   longer one). Side by side rather than one after another because a run's set-up
   (decode, compile, evaluator set-up, about 70 s of an H100 run) and final evaluation
   overlap the others' training; the table shows the aggregate pairs/s beside the
   breakdown's one-process rate, so that each lease checks what sharing cost. kNN
   (k = 20 and 200, all 10,000 test images against all 50,000 training images) three
   times during training; after it, ``emim.evaluate``: kNN and the linear probe on
   centre features (``--probe_epochs``). Past the training deadline a run is stopped
   (SIGTERM: a checkpoint at the step reached) and evaluated where it stands; the table
   says the epochs it reached.
3. ``emim.evaluate --random_init`` on the same data: the untrained network's figures.
4. evidence.md and evidence.json (method, epochs, kNN k=20/200, linear top-1, pairs/s,
   wall clock, the peak device memory of each run; the baseline; the breakdown's rates),
   evidence_runs.tgz (every run's logs, metrics.jsonl, timings.json, evaluation.json).

On a CPU the figures are a check of the script, nothing more.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from cifar_sweep import REPO, run_logged  # noqa: E402

METHODS = ("emmi", "barlow_twins", "byol")
# Seconds the schedule reserves, on an H100 (BENCHMARKS.md: decode 8 s, compile 42 s,
# evaluator set-up 12 s; emim.evaluate 40 s with the augmented probe, less on features).
SET_UP_S, EVALUATION_S, MARGIN_S = 80.0, 75.0, 20.0
# What side by side keeps of one process's rate (time-slicing, set-up overlapping others'
# training); the table reports what it was.
SHARING = 0.85


class Clock:
  """Seconds since the start, and what is left of the budget."""

  def __init__(self, budget_s: float):
    self.start, self.budget_s = time.monotonic(), budget_s

  def elapsed(self) -> float:
    return time.monotonic() - self.start

  def left(self) -> float:
    return self.budget_s - self.elapsed()


def log(clock: Clock, message: str) -> None:
  print(f"[{clock.elapsed():5.0f}s] {message}", flush=True)


def breakdown(args, clock: Clock, env: dict) -> dict:
  """The loop's program at the runs' batch, then at twice it, each batch written as it
  is timed: what finished inside the limit ({} when nothing did)."""
  out = pathlib.Path(args.out) / "breakdown"
  batches = [args.batch, 2 * args.batch]
  cmd = [sys.executable, "benchmarks/step_breakdown.py", f"--config={args.config}", "--parts", "whole",
         "--batch", *map(str, batches), "--steps", str(args.breakdown_steps), f"--out={out}"]
  limit = min(args.breakdown_limit_s, max(10.0, clock.left() - 120))
  rc = run_logged(cmd, pathlib.Path(args.out) / "breakdown.log", env, limit)
  path = out / "breakdown.json"
  report = json.loads(path.read_text()) if path.exists() else {}
  timed = sorted(int(b) for b in report.get("pairs_per_s", {}))
  if rc != 0:
    log(clock, f"the breakdown did not finish (exit {rc}, limit {limit:.0f}s; batches timed: "
               f"{timed or 'none'}): see breakdown.log")
  if timed:
    log(clock, f"breakdown: {json.dumps(report['pairs_per_s'])}")
  return report


def decode_once(args, env: dict) -> subprocess.Popen | None:
  """Decode the image folder into the cache the runs share (beside their work
  directories), in the background: the runs then load it instead of each decoding."""
  if not args.data:
    return None
  code = ("import ast, sys; from emim.config_base import load_config_file; from emim.data import sources\n"
          "c = load_config_file(sys.argv[1]); c.unlock()\n"
          "for arg in sys.argv[3:]:\n"
          "  key, value = arg[len('--config.'):].split('=', 1); *path, leaf = key.split('.'); node = c\n"
          "  for p in path: node = node[p]\n"
          "  try: node[leaf] = ast.literal_eval(value)\n"
          "  except (ValueError, SyntaxError): node[leaf] = value\n"
          "train = sources.load(c.data, 'train', sys.argv[2])\n"
          "sources.load(c.data, 'test', sys.argv[2], train_classes=train.class_names)\n")
  cache = str(pathlib.Path(args.workroot) / ".emim_cache")
  return subprocess.Popen([sys.executable, "-c", code, args.config, cache, *args.common], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def plan(args, clock: Clock, report: dict) -> dict:
  """Fused views or not, the rate, and the epochs that fit the time left."""
  rates = report.get("pairs_per_s", {}).get(str(args.batch))
  earlier = pathlib.Path(args.rate_from)
  if rates:
    fused = rates["fused"] > 1.03 * rates["per_view"]
    rate, source = max(rates["per_view"], rates["fused"]), "the breakdown"
  elif args.no_breakdown and earlier.is_file():  # an earlier call's on this machine
    setup = json.loads(earlier.read_text())["setup"]
    fused, rate, source = setup["fused_views"], setup["pairs_per_s_one_process"], f"{earlier}"
  else:
    fused, rate, source = False, args.fallback_pairs_per_s, "--fallback_pairs_per_s (no breakdown)"
  train_s = clock.left() - SET_UP_S - EVALUATION_S - MARGIN_S
  epochs = math.floor(max(train_s, 0.0) * SHARING * rate / (len(args.methods) * args.train_examples))
  epochs = args.epochs or max(1, min(epochs, args.max_epochs))
  return {"fused_views": fused, "pairs_per_s_one_process": rate, "rate_from": source, "epochs": epochs,
          "train_budget_s": round(train_s, 1), "side_by_side": True}


def run_method(method: str, args, setup: dict, clock: Clock, env: dict, results: dict) -> None:
  """Train one method, then evaluate its last checkpoint (and, for the first method, the
  untrained network)."""
  out = pathlib.Path(args.out) / "runs" / method
  out.mkdir(parents=True, exist_ok=True)
  workdir = pathlib.Path(args.workroot) / method
  shutil.rmtree(workdir, ignore_errors=True)
  variant = f"{method},runlocal" if args.smoke else method
  steps_per_epoch = args.train_examples // args.batch
  total = setup["epochs"] * steps_per_epoch
  common = [f"--config={args.config}:{variant}", *args.common]
  if setup["fused_views"]:
    common.append("--config.model.fused_views=True")
  knn = [f"--config.eval.every_steps={max(1, math.ceil(total / 3))}"]
  if not args.smoke:
    knn += ["--config.eval.knn_train_subset=50000", "--config.eval.knn_test_subset=10000"]
  train = [sys.executable, "-m", "emim.main", *common, *knn, f"--config.train.num_epochs={setup['epochs']}",
           f"--config.optim.warmup_epochs={max(1, setup['epochs'] // 10)}", f"--workdir={workdir}"]
  if args.smoke:
    train.append(f"--config.train.num_steps={total}")
  start = time.monotonic()
  train_limit = max(30.0, clock.left() - EVALUATION_S - MARGIN_S)
  train_rc = run_logged(train, out / "train.log", env, train_limit)
  train_s = time.monotonic() - start
  log(clock, f"{method}: training ended (exit {train_rc}) after {train_s:.0f}s")
  probe = ["--config.eval.probe_mode=features", f"--config.eval.probe_epochs={args.probe_epochs}"]
  evaluations = [("trained", [sys.executable, "-m", "emim.evaluate", f"--workdir={workdir}", *probe])]
  if method == args.methods[0]:
    evaluations.append(("untrained", [sys.executable, "-m", "emim.evaluate", f"--workdir={workdir}", "--random_init",
                                      *probe]))
  start = time.monotonic()
  for name, cmd in evaluations:
    rc = run_logged(cmd, out / f"evaluate_{name}.log", env, max(10.0, clock.left() - 5)) \
        if (workdir / "checkpoints").exists() else -1
    log(clock, f"{method}: {name} evaluation ended (exit {rc})")
  eval_s = time.monotonic() - start
  for name in ("metrics.jsonl", "timings.json", "evaluation.json", "config.json"):
    if (workdir / name).exists():
      shutil.copy(workdir / name, out / name)
  results[method] = summarize(method, out, steps_per_epoch, train_rc, train_s, eval_s)


def _json_lines(path: pathlib.Path) -> list[dict]:
  """The whole lines of a JSON-lines file (a run killed mid-write leaves a torn last one)."""
  rows = []
  for line in path.read_text().splitlines() if path.exists() else []:
    try:
      rows.append(json.loads(line))
    except ValueError:
      pass
  return rows


def summarize(method: str, out: pathlib.Path, steps_per_epoch: int, train_rc: int, train_s: float,
              eval_s: float) -> dict:
  """One row of the table from a run's files."""
  rows = _json_lines(out / "metrics.jsonl")
  progress = [r for r in rows if "pairs_per_s" in r]
  step = max((r["step"] for r in progress), default=0)
  try:
    evaluation = json.loads((out / "evaluation.json").read_text()) if (out / "evaluation.json").exists() else {}
  except ValueError:
    evaluation = {}
  trained = max((v for k, v in evaluation.items() if k.isdigit()), key=lambda v: v["step"], default={})
  untrained = evaluation.get("random_init", {})
  try:  # the device memory the run's process held at most (emim.train.device_memory_peak), where it counted
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}
  except ValueError:
    timings = {}
  pct = lambda v: None if v is None else round(100 * v, 2)
  return {
      "method": method, "epochs": round(step / steps_per_epoch, 2), "step": step, "train_exit": train_rc,
      "knn_k20": pct(trained.get("knn_top1_k20")), "knn_k200": pct(trained.get("knn_top1_k200")),
      "linear_top1": pct(trained.get("linear_top1")),
      # Training only (the loop excludes evaluators and checkpoint saves), the mean of the
      # progress lines after the first (which holds the first steps' dispatch).
      "pairs_per_s": round(sum(r["pairs_per_s"] for r in progress[1:]) / max(1, len(progress) - 1), 1)
      if len(progress) > 1 else None,
      "train_wall_s": round(train_s, 1), "eval_wall_s": round(eval_s, 1),
      "peak_device_memory_gib": timings.get("peak_device_memory_gib"),
      "knn_during_training": [{"step": r["step"], "k20": pct(r.get("knn/knn_top1_k20")),
                               "k200": pct(r.get("knn/knn_top1_k200"))} for r in rows if "knn/knn_top1_k20" in r],
      "untrained": {"knn_k20": pct(untrained.get("knn_top1_k20")), "knn_k200": pct(untrained.get("knn_top1_k200")),
                    "linear_top1": pct(untrained.get("linear_top1"))} if untrained else None,
  }


def table(results: dict, setup: dict, report: dict) -> str:
  fmt = lambda v: "" if v is None else (f"{v:g}" if isinstance(v, (int, float)) else str(v))
  lines = [f"{setup['config']}, batch {setup['batch']}, {setup['epochs']} epochs each (the schedule of a "
           f"{setup['epochs']}-epoch run), side by side on {report.get('device', 'the device')}"
           f"{', views fused' if setup['fused_views'] else ''}; kNN (k = 20, 200) on every test image, the linear "
           f"probe on centre features ({setup['probe_epochs']} epochs). Top-1 accuracies in %.\n",
           "| method | epochs | kNN k=20 | kNN k=200 | linear top-1 | pairs/s (side by side) | train wall s | "
           "eval wall s | peak device GiB (training) |", "|---|---|---|---|---|---|---|---|---|"]
  baseline = None
  for r in results.values():
    if "error" in r:
      lines.append(f"| {r['method']} | failed: {r['error']} | | | | | | | |")
      continue
    lines.append(f"| {r['method']} | {fmt(r['epochs'])} | {fmt(r['knn_k20'])} | {fmt(r['knn_k200'])} | "
                 f"{fmt(r['linear_top1'])} | {fmt(r['pairs_per_s'])} | {fmt(r['train_wall_s'])} | "
                 f"{fmt(r['eval_wall_s'])} | {fmt(r.get('peak_device_memory_gib'))} |")
    baseline = baseline or r["untrained"]
  if baseline:
    lines.append(f"| untrained (random init) | 0 | {fmt(baseline['knn_k20'])} | {fmt(baseline['knn_k200'])} | "
                 f"{fmt(baseline['linear_top1'])} | | | | |")
  together = sum(r.get("pairs_per_s") or 0.0 for r in results.values())
  lines.append(f"\nOne process alone ({setup['rate_from']}): {setup['pairs_per_s_one_process']:.0f} pairs/s; the "
               f"runs side by side: {together:.0f} pairs/s together.")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/cifar10.py")
  p.add_argument("--data", default="", help="the image folder or archive (config.data.path)")
  p.add_argument("--methods", nargs="+", default=list(METHODS))
  p.add_argument("--budget_s", type=float, default=510.0, help="everything ends inside this many seconds")
  p.add_argument("--epochs", type=int, default=0, help="force the epochs; 0: as many as fit")
  p.add_argument("--max_epochs", type=int, default=400)
  p.add_argument("--batch", type=int, default=256, help="the runs' batch (the config's)")
  p.add_argument("--train_examples", type=int, default=50000)
  p.add_argument("--probe_epochs", type=int, default=100)
  p.add_argument("--breakdown_steps", type=int, default=20)
  p.add_argument("--breakdown_limit_s", type=float, default=130.0,
                 help="the breakdown's limit (100 s cut it short on an H200, 2026-12-04); the runs' batch "
                      "is timed first, so a limit that cuts the larger batch still gives the plan its rate")
  p.add_argument("--no_breakdown", action="store_true",
                 help="no breakdown: the rate of an earlier call on this machine (--rate_from), else the fallback")
  p.add_argument("--rate_from", default="/tmp/emim_evidence_runs/evidence.json")
  p.add_argument("--fallback_pairs_per_s", type=float, default=17962.0,
                 help="the rate without a breakdown (the H100's bf16 batch-256 figure, BENCHMARKS.md)")
  p.add_argument("--set", action="append", default=[], help="another override for every program (--set=--config.a=b)")
  p.add_argument("--smoke", action="store_true", help="CPU check: the synthetic config's runlocal, a few steps")
  p.add_argument("--out", default=os.environ.get("OUT", "/tmp/emim_evidence"))
  p.add_argument("--workroot", default="/tmp/emim_evidence_runs")
  args = p.parse_args()
  if args.smoke:
    args.config, args.data, args.batch, args.train_examples = "configs/synthetic.py", "", 32, 512
    args.probe_epochs, args.breakdown_steps, args.max_epochs = 2, 3, 2
    args.fallback_pairs_per_s, args.breakdown_limit_s = 200.0, 300.0
  args.common = ([f"--config.data.path={pathlib.Path(args.data).resolve()}"] if args.data else []) + args.set
  clock = Clock(args.budget_s)
  pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
  pathlib.Path(args.workroot).mkdir(parents=True, exist_ok=True)
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))

  decoding = decode_once(args, env)
  config_arg = f"{args.config}:runlocal" if args.smoke else args.config
  report = {} if args.no_breakdown else breakdown(argparse.Namespace(**{**vars(args), "config": config_arg}), clock,
                                                   env)
  if decoding is not None:
    try:
      decoding.wait(timeout=max(1.0, clock.left() - 300))
    except subprocess.TimeoutExpired:  # the runs decode for themselves
      log(clock, "the shared decode is still running; the runs go on without waiting for it")
  setup = {**plan(args, clock, report), "batch": args.batch, "probe_epochs": args.probe_epochs,
           "config": f"{args.config} (CPU smoke: runlocal)" if args.smoke else args.config}
  log(clock, f"plan: {json.dumps(setup)}")
  run_env = dict(env, XLA_PYTHON_CLIENT_MEM_FRACTION=f"{0.9 / (len(args.methods) + 1):.3f}")
  results: dict = {}
  written = threading.Lock()

  def write_tables():
    """The table so far: after each method, so that a call cut short still returns it."""
    with written:
      done = {m: results[m] for m in args.methods if m in results}
      text = table(done, setup, report)
      record = json.dumps({"setup": setup, "breakdown": report, "results": done, "wall_s": round(clock.elapsed(), 1)},
                          indent=1)
      (pathlib.Path(args.out) / "evidence.md").write_text(text + "\n")
      (pathlib.Path(args.out) / "evidence.json").write_text(record)
      (pathlib.Path(args.workroot) / "evidence.json").write_text(record)  # for a later call's --no_breakdown
      return text

  def run_and_record(method):
    try:
      run_method(method, args, setup, clock, run_env, results)
    except Exception as e:  # a row saying so, not a row missing
      log(clock, f"{method}: {type(e).__name__}: {e}")
      results[method] = {"method": method, "error": f"{type(e).__name__}: {e}"[:300]}
    write_tables()

  threads = [threading.Thread(target=run_and_record, args=(m,)) for m in args.methods]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  print(write_tables(), flush=True)
  with tarfile.open(pathlib.Path(args.out) / "evidence_runs.tgz", "w:gz") as tar:
    tar.add(pathlib.Path(args.out) / "runs", arcname="runs")
    for name in ("breakdown.log",):
      if (pathlib.Path(args.out) / name).exists():
        tar.add(pathlib.Path(args.out) / name, arcname=name)
  shutil.rmtree(pathlib.Path(args.out) / "runs")
  (pathlib.Path(args.out) / "breakdown.log").unlink(missing_ok=True)
  log(clock, f"evidence written to {args.out}")


if __name__ == "__main__":
  main()
