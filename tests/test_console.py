"""What runs print: few named values a progress line, everything in metrics.jsonl; the
run's estimated time (and, for a long run on a CPU, the tiny variant); where the results
are at the end; no line about a TPU that is not meant; no Orbax chatter in the programs
that read checkpoints; the MI experiments' progress within a run."""

import importlib.util
import io
import logging
import re
import sys

import jax.numpy as jnp
import pytest
from conftest import REPO, tiny_synthetic

from emim import checkpoint as ckpt_lib
from emim import cli, console, train
from emim.metric_writer import read_metrics

# The full CIFAR-10 config on this 2-core CPU, as measured (issue 29): a step of 24.8 s.
CIFAR_STEP_S = 24.8


def messages(caplog, level=logging.INFO):
  return [r.getMessage() for r in caplog.records if r.levelno >= level]


def test_a_run_shows_few_named_values_keeps_all_and_ends_saying_where_and_how_to_evaluate(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  train.run(tiny_synthetic(), str(tmp_path))
  said = messages(caplog)
  progress = [m for m in said if re.match(r"step \d+/4 ", m)]
  mi = [m for m in said if re.match(r"step \d+ \| mi ", m)]
  assert len(progress) == 2 and len(mi) == 3, said
  for line in progress:
    assert re.fullmatch(r"step \d/4 epoch [\d.]+ \| [\d.]+ steps/s \d+ pairs/s \| ETA \S+ \| loss=\S+ mi=\S+ "
                        r"probe_acc=\S+", line), line
  for line in mi:
    assert re.fullmatch(r"step \d \| mi \([\d.]+s\): mi_infonce=\S+ mi_gaussian=\S+ effective_rank=\S+", line), line
  recorded = {k for row in read_metrics(tmp_path / "metrics.jsonl") for k in row}  # every value, shown or not
  assert {"ld_sum", "ld_diff", "grad_norm", "probe_loss", "eval/mi_jsd", "eval/mi_dv",
          "eval/rescaled_eig_min_sum"} <= recorded, recorded
  assert said[-1] == (f"Finished: 4 steps. Results in {tmp_path}: metrics.jsonl (every value of every progress line; "
                      f"TensorBoard: tensorboard --logdir={tmp_path}), checkpoints/, config.json. Evaluate the backbone "
                      f"(linear probe and kNN): python -m emim.evaluate --workdir={tmp_path}")
  assert not any("Unable to initialize backend" in m or "transition_steps" in m for m in said)


def test_the_progress_line_shows_what_progress_metrics_names():
  host = {"loss": -2.0, "mi": 2.0, "ld_sum": -100.0, "ld_diff": -120.0, "probe_acc": 0.5, "lr": 0.1}
  line = lambda setting: train.ProgressLine(0, 10, 10, 5, 32, setting)
  for setting, expected in (("", "loss=-2 mi=2 probe_acc=0.5"), ("all", "loss=-2 mi=2 ld_sum=-100 ld_diff=-120 "
                                                                        "probe_acc=0.5"), ("ld_sum, loss", "ld_sum=-100 loss=-2")):
    with pytest.MonkeyPatch.context() as m:
      logged = []
      m.setattr(train.logging, "info", lambda fmt, *args: logged.append(fmt % args))
      line(setting)(2, host)
    assert logged[0].endswith(f"| {expected}"), (setting, logged)
  knn = {"knn/knn_top1_k20": 0.61, "knn/knn_top1_k5": 0.58}
  assert console.values(knn) == "knn_top1_k20=0.61 knn_top1_k5=0.58"


def test_a_long_run_on_a_cpu_says_its_time_and_the_tiny_variant(monkeypatch, caplog):
  caplog.set_level(logging.INFO)
  clock = iter([100.0, 100.0 + CIFAR_STEP_S])
  monkeypatch.setattr(console.time, "perf_counter", lambda: next(clock))
  monkeypatch.setattr(sys, "argv", ["emim.main", "--config=configs/cifar10.py:byol", "--workdir=runs/c10"])
  first = console.FirstSteps(0, 195000, 195000, "cpu")
  for done in range(1, 5):
    first.after(done, jnp.zeros(()))
  assert messages(caplog, logging.WARNING) == [
      "A step takes 24.8 s here (cpu): the 194,998 steps left of 195,000 should take about 55 d 23 h (measured on the "
      "second step; the progress lines' ETA refines it). This config is sized for an accelerator (the README says "
      "which config suits which hardware). To try it on this CPU in a minute or so, stop this run (Ctrl-C) and run its tiny "
      "variant: --config=configs/cifar10.py:byol,runlocal."]
  # The same run on an accelerator is told its time only; a short run, nothing.
  line, warn = console.estimate_message(0.05, 194998, 195000, "gpu")
  assert not warn and line.endswith("should take about 2 h 42 min (measured on the second step; the progress lines' "
                                    "ETA refines it).")
  assert console.estimate_message(3.0, 1000, 1000, "cpu")[1] is False  # 50 min on a CPU: no advice
  caplog.clear()
  clock = iter([0.0, 0.1])
  short = console.FirstSteps(0, 960, 960, "cpu")
  for done in range(1, 4):
    short.after(done, jnp.zeros(()))
  assert messages(caplog) == []


def test_no_line_about_a_tpu_where_libtpu_is_not_installed(monkeypatch, caplog):
  """Without libtpu (a user's CPU venv), JAX's probe for a TPU logs "Unable to initialize
  backend 'tpu': ... libtpu.so" (jax._src.xla_bridge, at INFO, which the programs show)
  as a run's first line; the programs drop that line, and only it."""
  caplog.set_level(logging.INFO)
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setattr(cli, "_libtpu_installed", lambda: False)
  xla_bridge = logging.getLogger("jax._src.xla_bridge")
  monkeypatch.setattr(xla_bridge, "filters", list(xla_bridge.filters))  # (restored after the test)
  cli.cpu_without_accelerator()
  # JAX's own words (xla_bridge.backends: logger.info(f"Unable to initialize backend '{platform}': {err}")).
  xla_bridge.info("Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so: libtpu.so: cannot open "
                  "shared object file: No such file or directory")
  xla_bridge.info("Unable to initialize backend 'cuda': no CUDA plugin")
  assert messages(caplog) == ["Unable to initialize backend 'cuda': no CUDA plugin"]
  assert "JAX_PLATFORMS" not in __import__("os").environ  # a GPU plugin, if any, is still chosen


def test_reading_checkpoints_says_nothing_of_orbax(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  (tmp_path / "checkpoints").mkdir()
  assert ckpt_lib.latest_step(tmp_path / "checkpoints") is None
  orbax = [r for r in caplog.records if "orbax" in r.pathname]
  assert not orbax, [r.getMessage() for r in orbax]


def test_the_mi_experiments_show_a_few_progress_lines_a_run():
  spec = importlib.util.spec_from_file_location("mi_experiments", REPO / "benchmarks" / "mi_experiments.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert "8 methods, 4-7 min on a 2-core CPU" in module.__doc__
  stream = io.StringIO()
  handler = module.show_progress(stream)
  try:
    for step in range(50, 1501, 50):
      logging.info("step %d/1500 epoch 1 | 100 steps/s 25600 pairs/s | ETA 0m10s | loss=-1", step)
      logging.info("step %d | mi (0.1s): mi_infonce=1", step)
    logging.warning("a warning")
  finally:
    logging.getLogger().removeHandler(handler)
  shown = [line.split(" ", 3)[3] for line in stream.getvalue().splitlines()]
  assert shown[:-1] == [f"step {s}/1500 epoch 1 | 100 steps/s 25600 pairs/s | ETA 0m10s | loss=-1"
                        for s in (300, 600, 900, 1200, 1500)]
  assert stream.getvalue().splitlines()[-1].endswith("a warning")


def test_the_last_line_of_a_stopped_run_says_how_to_resume_it():
  from emim import console
  by_signal = console.summary("/w", 40, 100, stopped=True, tensorboard=False)
  assert "Stopped at step 40 of 100 (the same command resumes it)" in by_signal
  assert "--stop_at_step" not in by_signal  # a Ctrl-C'd run was given no such flag
  by_flag = console.summary("/w", 40, 100, stopped=True, tensorboard=False, by_stop_at_step=True)
  assert "(the same command without --stop_at_step resumes it)" in by_flag
  assert console.summary("/w", 100, 100, stopped=False, tensorboard=True).startswith("Finished: 100 steps.")


def test_a_progress_metric_name_the_run_lacks_is_named_with_the_ones_it_has():
  from emim import console
  seen = {"loss", "mi", "probe_acc", "eval/mi_infonce", "knn/knn_top1_k20"}
  assert console.unknown_names("", seen) is None and console.unknown_names("all", seen) is None
  assert console.unknown_names("loss, mi_infonce", seen) is None
  warning = console.unknown_names("loss,bogus_metric", seen)
  assert "'bogus_metric'" in warning and "'loss'" not in warning
  assert "knn_top1_k20, loss, mi, mi_infonce, probe_acc" in warning
