"""The training loop: mesh, data, state, restore, step, log, checkpoint.

    python -m emim.main --config=configs/cifar10.py --workdir=/tmp/run

A run resumes from the newest checkpoint in its work directory, or forks another run's
(``--config.checkpoint.init_from=DIR [--config.checkpoint.restore_step=N]``). Randomness
and the order of data held on the device are functions of the step, and a streamed
pipeline's iterator position is saved with each checkpoint, so an interrupted run and an
uninterrupted one give the same parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pathlib
import signal
import threading
import time

import jax
import ml_collections
import numpy as np
import optax

from emim import checkpoint as ckpt_lib
from emim import methods, models, optim, sharding
from emim.backbone import backbone_from_model_config, model_config_of
from emim.data.pipeline import make_train_data
from emim.evaluators.knn import PeriodicKnn
from emim.evaluators.mi_tracker import make_mi_tracker
from emim.metric_writer import MetricWriter
from emim.target import momentum_schedule
from emim.train_step import StepParts, TrainState, init_state


@dataclasses.dataclass
class RunResult:
  state: TrainState
  final_metrics: dict
  timings: dict
  stopped_by_signal: int | None = None  # SIGTERM/SIGINT: saved at the step reached, resumable


DETERMINISTIC_GPU_FLAG = "--xla_gpu_deterministic_ops=true"


def use_deterministic_gpu_ops() -> None:
  """Ask XLA for deterministic GPU kernels (``config.train.deterministic``). XLA reads its
  flags when JAX starts its backends: ``python -m emim.main`` calls this first; in a
  notebook, call it before the first JAX computation."""
  flags = os.environ.get("XLA_FLAGS", "")
  if DETERMINISTIC_GPU_FLAG not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_GPU_FLAG}".strip()


def _check_deterministic(config: ml_collections.ConfigDict) -> None:
  if config.train.deterministic and jax.default_backend() == "gpu" and DETERMINISTIC_GPU_FLAG not in os.environ.get("XLA_FLAGS", ""):
    logging.warning("config.train.deterministic is set but JAX started without XLA_FLAGS=%s: this run's GPU kernels "
                    "may not be deterministic. Call emim.train.use_deterministic_gpu_ops() before the first JAX "
                    "computation (python -m emim.main does).", DETERMINISTIC_GPU_FLAG)


class StopRequest:
  """Turns SIGTERM and SIGINT (a preempted VM, a Slurm time limit, Ctrl-C) into a request
  the loop honours between steps: it saves a checkpoint at the step reached and stops, so
  a preemption costs no training. A second signal acts as usual (the handlers are
  restored on the first).

  Installed only in the main thread of a single-process job. With several processes,
  JAX's preemption service (``jax.distributed.initialize``) tells every process, through
  Orbax, to stop at the same step instead.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum: int | None = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    self._restore()
    logging.warning("Received %s: saving a checkpoint after the current step, then stopping.", signal.Signals(signum).name)

  def _restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
      self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
    return self

  def __exit__(self, *exc):
    self._restore()


def build_parts(config: ml_collections.ConfigDict, num_classes: int, steps_per_epoch: int, total_steps: int) -> StepParts:
  """The static pieces of the step from the config."""
  method = methods.make_method(config.method)
  encoder = models.make_encoder(config.model)
  predictor = models.make_predictor(config.model) if method.uses_predictor else None
  lr_fn = optim.learning_rate_schedule(config.optim, config.train.batch_size, steps_per_epoch, total_steps)
  momentum_fn = momentum_schedule(config.method.target_momentum, total_steps) if method.uses_target else None
  return StepParts(
      method=method, encoder=encoder, predictor=predictor, tx=optim.make_optimizer(config.optim, lr_fn),
      probe_tx=optax.adam(config.train.probe_lr), momentum_fn=momentum_fn, lr_fn=lr_fn,
      view1=config.augment.view1, view2=config.augment.view2, image_size=config.data.image_size,
      mean=tuple(config.data.mean), std=tuple(config.data.std), num_classes=num_classes)


def default_cache_dir(workdir: pathlib.Path) -> str:
  """Decoded datasets are cached beside the work directory, shared by runs next to it."""
  return str(workdir.absolute().parent / ".emim_cache")


# Step metrics that are not loss terms; the progress line shows the rest (the loss, the
# method's own terms, e.g. ld_sum or bt_off_diag) and the online-probe accuracy.
_NOT_TERMS = ("lr", "target_momentum", "grad_norm", "update_norm", "param_norm", "probe_loss", "embedding_std",
              "rank_renyi2", "finite")


def _is_loss_term(name: str) -> bool:
  return name not in _NOT_TERMS and not name.startswith(("beta_", "rescaled_eig"))


def _format_eta(seconds: float) -> str:
  h, rem = divmod(int(seconds), 3600)
  return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


class ProgressLine:
  """The steady progress line: step, epoch, steps/s and pairs/s since the last line, ETA,
  and the loss terms."""

  def __init__(self, start_step: int, last_step: int, total_steps: int, steps_per_epoch: int, batch_size: int):
    self.last_step, self.total_steps, self.steps_per_epoch, self.batch_size = last_step, total_steps, steps_per_epoch, batch_size
    self._time, self._step = time.perf_counter(), start_step

  def __call__(self, done: int, host_metrics: dict) -> dict:
    """Log the line for step ``done``; returns the rates to record with the metrics."""
    now = time.perf_counter()
    rate = (done - self._step) / max(now - self._time, 1e-9)
    self._time, self._step = now, done
    eta = (self.last_step - done) / max(rate, 1e-9)
    terms = " ".join(f"{k}={float(v):.4g}" for k, v in host_metrics.items() if _is_loss_term(k))
    logging.info("step %d/%d epoch %.2f | %.2f steps/s %.0f pairs/s | ETA %s | %s", done, self.total_steps,
                 done / self.steps_per_epoch, rate, rate * self.batch_size, _format_eta(eta), terms)
    return {"epoch": done / self.steps_per_epoch, "steps_per_s": rate, "pairs_per_s": rate * self.batch_size}


def _check_finite(state: TrainState, host_metrics: dict, done: int, checkpoint_dir: pathlib.Path) -> None:
  """The step refuses non-finite updates and counts them; the loop stops at the next line."""
  if int(state.nonfinite_steps) > 0:
    raise FloatingPointError(
        f"Non-finite loss or gradient at or before step {done} ({int(state.nonfinite_steps)} update(s) refused; "
        f"last loss {float(host_metrics['loss'])}). The last checkpoint in {checkpoint_dir} is intact. Lower "
        "--config.optim.base_lr, raise the objective's eps, or set --config.optim.clip_norm.")


def restore_or_init(config: ml_collections.ConfigDict, checkpointer: ckpt_lib.Checkpointer, abstract_state, data):
  """The state to start from, with the data iterator positioned to match it: the run's own
  latest checkpoint (or ``checkpoint.restore_step``), else the checkpoint of the run named
  by ``checkpoint.init_from`` (a fork), else None (a fresh start)."""
  restore_step = None if config.checkpoint.restore_step < 0 else config.checkpoint.restore_step
  source = checkpointer
  if checkpointer.latest_step() is not None:
    ckpt_lib.check_can_continue(checkpointer, restore_step)
  elif config.checkpoint.init_from:
    source = ckpt_lib.Checkpointer(pathlib.Path(config.checkpoint.init_from) / "checkpoints", read_only=True)
  elif restore_step is not None:
    raise ckpt_lib.CheckpointError(
        f"--config.checkpoint.restore_step={restore_step}, but {checkpointer.directory} holds no checkpoint. To start "
        "from another run's step, add --config.checkpoint.init_from=THAT_RUNS_WORKDIR.")
  else:
    return None
  try:
    state, data_restored = source.restore(abstract_state, restore_step, data.iterator)
  finally:
    if source is not checkpointer:
      source.close()
  if state is None:
    raise ckpt_lib.CheckpointError(f"--config.checkpoint.init_from: {source.directory} holds no checkpoint.")
  if data.iterator is not None and not data_restored:
    data.start_at(int(state.step))
  logging.info("Resumed from step %d in %s%s.", int(state.step), source.directory,
               " with the data iterator's position" if data_restored else "")
  return state


def run(config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None) -> RunResult:
  """Train (or resume) the run in ``workdir``.

  Args:
    config: the experiment config (configs/*.py).
    workdir: checkpoints, config.json and metrics.jsonl go here.
    stop_at_step: stop (with a checkpoint) after this many steps, as a preemption would;
      the schedule is still that of the full run, which a later call resumes.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  timings = {}

  # --- Mesh ------------------------------------------------------------------------
  _check_deterministic(config)
  mesh = sharding.make_mesh()
  sharding.check_batch_size(config.train.batch_size, mesh)
  replicated = sharding.replicated(mesh)

  # --- Data: on the devices (CIFAR) or streamed from host workers (ImageNet) -------
  t0 = time.perf_counter()
  data = make_train_data(config, mesh, default_cache_dir(workdir))
  timings["decode_s"] = time.perf_counter() - t0
  batch_size = config.train.batch_size
  steps_per_epoch = data.num_examples // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"The training set has {data.num_examples} images, fewer than one batch of {batch_size}.")
  total_steps = config.train.num_steps or config.train.num_epochs * steps_per_epoch
  logging.info("Data: %d images, %d steps/epoch, %d steps.", data.num_examples, steps_per_epoch, total_steps)

  # --- State, created sharded, or restored ------------------------------------------
  parts = build_parts(config, data.num_classes, steps_per_epoch, total_steps)
  rng = jax.random.PRNGKey(config.seed)
  init_fn = functools.partial(init_state, parts)
  abstract = jax.eval_shape(init_fn, rng)
  state_sharding = jax.tree.map(lambda _: replicated, abstract)
  checkpointer = ckpt_lib.Checkpointer(
      workdir / "checkpoints", config.checkpoint.every_steps, config.checkpoint.keep, config.checkpoint.async_save)
  state = restore_or_init(config, checkpointer, ckpt_lib.abstract_like(abstract, state_sharding), data)
  if state is None:
    state = jax.jit(init_fn, out_shardings=state_sharding)(rng)
  if not (workdir / "config.json").exists():
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  start_step = int(state.step)

  # --- The step, compiled once ahead of time ----------------------------------------
  t0 = time.perf_counter()
  step_fn = data.compile_step(parts, state, state_sharding)
  timings["compile_s"] = time.perf_counter() - t0

  # --- Evaluators (decoding their test subsets counts here, not in decode_s) ---------
  t0 = time.perf_counter()
  # A fixed random subset of the training images for the MI estimates.
  mi_images = sharding.put_global(
      data.train_subset(min(data.num_examples, config.eval.mi_batch_size), seed=1).images, replicated)
  track_mi = make_mi_tracker(parts, objective_eps=config.method.get("eps", 1e-4)).lower(state, mi_images).compile()
  periodic_knn = None
  if config.eval.every_steps > 0:
    backbone = backbone_from_model_config(model_config_of(config), {})
    periodic_knn = PeriodicKnn(backbone, data.train_subset(config.eval.knn_train_subset),
                               data.test_subset(config.eval.knn_test_subset), config.eval, mesh)

  timings["eval_setup_s"] = time.perf_counter() - t0
  # The step and the MI tracker are compiled: hosts start stepping together, whatever
  # each one's compile time was.
  ckpt_lib.sync_processes("emim_compiled")
  # Written now and again at the end, so a run stopped early still tells its set-up costs.
  (workdir / "timings.json").write_text(json.dumps(timings, indent=2))

  def knn_eval(step):
    variables = {"params": state.params["encoder"]["backbone"], "batch_stats": state.batch_stats["encoder"]["backbone"]}
    t = time.perf_counter()
    accuracy = periodic_knn(variables)
    logging.info("step %d | kNN on %d test images: %s (%.1fs)", step, config.eval.knn_test_subset,
                 " ".join(f"{k}={v:.4f}" for k, v in accuracy.items()), time.perf_counter() - t)
    writer.write(step, {f"knn/{k}": v for k, v in accuracy.items()})
    return {f"knn/{k}": v for k, v in accuracy.items()}

  def log_mi(step):
    # Wait for every device's copy, not only the one device_get reads: the estimates are
    # replicated, and a step dispatched (and a checkpoint begun) while other devices still
    # run the tracker wedged the 8-device CPU tests twice, every thread parked.
    evals = jax.device_get(jax.block_until_ready(track_mi(state, mi_images)))
    logging.info("step %d | %s", step, " ".join(f"{k.split('/')[-1]}={float(v):.4g}" for k, v in evals.items()))
    writer.write(step, evals)
    return evals

  # --- Loop -------------------------------------------------------------------------
  writer = MetricWriter(workdir)
  if start_step == 0:
    log_mi(0)
  last_step = total_steps if stop_at_step is None else min(stop_at_step, total_steps)
  log_every = max(1, config.train.log_every)
  metrics, final = None, {}
  t_train = time.perf_counter()
  progress = ProgressLine(start_step, last_step, total_steps, steps_per_epoch, batch_size)
  with StopRequest() as stop:
    try:
      for step in range(start_step, last_step):
        state, metrics = step_fn(state)
        done = step + 1
        if done % log_every == 0 or done == last_step:
          host = jax.device_get(metrics)
          _check_finite(state, host, done, checkpointer.directory)
          writer.write(done, {**host, **progress(done, host)})
          final = {**host, **log_mi(done)}
        if periodic_knn is not None and (done % config.eval.every_steps == 0 or done == last_step):
          final.update(knn_eval(done))
        preempted = stop.signum is not None or checkpointer.reached_preemption(done)
        checkpointer.save(done, state, data.iterator, force=preempted or done == last_step)
        if preempted:
          logging.warning("Stopped at step %d of %d; the checkpoint is in %s. Run the same command to resume.",
                          done, total_steps, checkpointer.directory)
          break
    finally:
      checkpointer.close()
      writer.close()
  timings["train_s"] = time.perf_counter() - t_train
  logging.info("Timings: decode %.1fs, compile %.1fs, evaluator set-up %.1fs, train %.1fs.", timings["decode_s"],
               timings["compile_s"], timings["eval_setup_s"], timings["train_s"])
  (workdir / "timings.json").write_text(json.dumps(timings, indent=2))
  return RunResult(state=state, final_metrics={k: float(np.asarray(v)) for k, v in final.items()}, timings=timings,
                   stopped_by_signal=stop.signum)
