"""What a training run says on the console, beside the files that hold everything.

The progress lines show a few named values (``SHOWN``); every value of every line goes
to ``metrics.jsonl`` and TensorBoard regardless (docs/outputs.md says what each means).
``--config.train.progress_metrics=all`` shows them all, or a comma-separated list of names
those. The run's first steps are timed for an estimate of the whole run's time (on a CPU,
with the tiny ``:runlocal`` variant suggested when that is long), and its end says where
its results are and how to evaluate it. Nothing here imports JAX.
"""

from __future__ import annotations

import logging
import sys
import time

# The values a progress line shows by default, in this order, where a line has them: the
# step line's loss, the objective's own surrogate MI (EMMI) and the online linear probe's
# accuracy on the training batches; the MI line's InfoNCE and Gaussian estimates, the
# exact MI where known (the Gaussian mixture) and the embedding's effective rank.
SHOWN = ("loss", "mi", "probe_acc", "true_mi", "mi_infonce", "mi_gaussian", "effective_rank")
# A run whose estimated time on a CPU is longer than this is told about ``:runlocal``.
LONG_CPU_RUN_S = 3600.0
# Runs shorter than this are not told their estimated time (their first progress line is near).
ESTIMATE_ABOVE_S = 120.0


def shown(metrics: dict, setting: str = "") -> dict:
  """The values of ``metrics`` a progress line shows (names without their "eval/" or
  "knn/" prefix): ``setting`` is config.train.progress_metrics ("": ``SHOWN``; "all";
  or comma-separated names)."""
  short = {k.split("/")[-1]: v for k, v in metrics.items()}
  if setting == "all":
    return short
  # kNN's accuracies (one per config.eval.knn_k) are shown whatever their k.
  names = (*SHOWN, *(n for n in short if n.startswith("knn_top1"))) if not setting else tuple(
      n.strip() for n in setting.split(",") if n.strip())
  return {n: short[n] for n in dict.fromkeys(names) if n in short}


def requested(setting: str) -> tuple[str, ...]:
  """The names a progress_metrics setting asks for by name (none for "" and "all")."""
  return () if setting in ("", "all") else tuple(dict.fromkeys(n.strip() for n in setting.split(",") if n.strip()))


def unknown_names(setting: str, seen: set[str]) -> str | None:
  """A warning when progress_metrics names values this run has none of (after its first
  progress line and evaluators: a misspelt name would otherwise show nothing, silently)."""
  short = {k.split("/")[-1] for k in seen}
  unknown = [n for n in requested(setting) if n not in short]
  if not unknown:
    return None
  return (f"--config.train.progress_metrics: this run has no value named {', '.join(map(repr, unknown))}; its "
          f"values are: {', '.join(sorted(short))} (or 'all').")


def values(metrics: dict, setting: str = "") -> str:
  return " ".join(f"{k}={float(v):.4g}" for k, v in shown(metrics, setting).items())


def config_argument(default: str = "configs/<config>.py") -> str:
  """The --config= value this program was started with (what a suggested command repeats)."""
  for arg in sys.argv[1:]:
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
  return default


def duration(seconds: float) -> str:
  """3 d 4 h, 5 h 12 min, 7 min, 40 s."""
  s = int(round(seconds))
  days, hours, minutes = s // 86400, s % 86400 // 3600, s % 3600 // 60
  if days:
    return f"{days} d {hours} h"
  if hours:
    return f"{hours} h {minutes} min"
  return f"{minutes} min" if minutes else f"{s} s"


def runlocal_variant(config_arg: str) -> str:
  """``configs/x.py:byol`` -> ``configs/x.py:byol,runlocal``."""
  path, _, variants = config_arg.partition(":")
  return f"{path}:{variants},runlocal" if variants else f"{path}:runlocal"


def estimate_message(step_s: float, steps_left: int, total_steps: int, backend: str,
                     config_arg: str | None = None) -> tuple[str, bool]:
  """(the line that says how long the run will take, whether it is a warning): on a CPU a
  run longer than ``LONG_CPU_RUN_S`` is told that it is meant for an accelerator and
  which tiny variant runs here."""
  line = (f"A step takes {step_s:.3g} s here ({backend}): the {steps_left:,} steps left of {total_steps:,} should "
          f"take about {duration(step_s * steps_left)} (measured on the second step; the progress lines' ETA refines it).")
  if backend != "cpu" or step_s * steps_left <= LONG_CPU_RUN_S:
    return line, False
  config_arg = config_arg or config_argument()
  return (f"{line} This config is sized for an accelerator (the README says which config suits which hardware). To try it "
          f"on this CPU in a minute or so, stop this run (Ctrl-C) and run its tiny variant: "
          f"--config={runlocal_variant(config_arg)}."), True


class FirstSteps:
  """Times the second step (the first may still be warming up), then logs the run's
  estimated time once. ``after(done, state)`` follows each step."""

  def __init__(self, start_step: int, last_step: int, total_steps: int, backend: str):
    self._start, self._last, self._total, self._backend = start_step, last_step, total_steps, backend
    self._t = None

  def after(self, done: int, state) -> None:
    if done not in (self._start + 1, self._start + 2) or done >= self._last:
      return
    import jax  # only when timing: nothing else here needs JAX

    jax.block_until_ready(state)
    now = time.perf_counter()
    if done == self._start + 1:
      self._t = now
      return
    step_s = now - self._t
    if step_s * (self._last - done) > ESTIMATE_ABOVE_S:
      line, warn = estimate_message(step_s, self._last - done, self._total, self._backend)
      (logging.warning if warn else logging.info)(line)


def summary(workdir: str, step: int, total_steps: int, stopped: bool, tensorboard: bool,
            by_stop_at_step: bool = False) -> str:
  """The run's last line: where its results are and the command that evaluates it."""
  resume = "the same command without --stop_at_step" if by_stop_at_step else "the same command"
  state = (f"Stopped at step {step:,} of {total_steps:,} ({resume} resumes it)" if stopped
           else f"Finished: {step:,} steps")
  board = f"; TensorBoard: tensorboard --logdir={workdir}" if tensorboard else ""
  return (f"{state}. Results in {workdir}: metrics.jsonl (every value of every progress line{board}), "
          f"checkpoints/, config.json. Evaluate the backbone (linear probe and kNN): "
          f"python -m emim.evaluate --workdir={workdir}")
