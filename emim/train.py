"""The training loop: lock, mesh, data, state, restore, evaluators, step, log, checkpoint.

    python -m emim.main --config=configs/cifar10.py --workdir=/tmp/run

A run resumes from the newest checkpoint in its work directory, or forks another run's
(``--config.checkpoint.init_from=DIR [--config.checkpoint.restore_step=N]``). Randomness
and the order of data held on the device are functions of the step, and a streamed
pipeline's iterator position is saved with each checkpoint, so an interrupted run and an
uninterrupted one give the same parameters.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import logging
import os
import shutil
import signal
import threading
import time

import jax
import ml_collections
import numpy as np
import optax
from clu import parameter_overview

from emim import checkpoint as ckpt_lib
from emim import compiled, config_base, console, fs, metric_writer, methods, models, optim, sharding, step_metrics
from emim import workdir as workdir_lib
from emim.data import sources
from emim.data.pipeline import make_train_data
from emim.evaluators import Context as EvalContext
from emim.evaluators import due as evaluator_due
from emim.evaluators import make_evaluators
from emim.metric_writer import MetricWriter
from emim.target import momentum_schedule
from emim.train_step import StepParts, TrainState, init_state


@dataclasses.dataclass
class RunResult:
  state: TrainState
  final_metrics: dict
  timings: dict
  stopped_by_signal: int | None = None  # SIGTERM/SIGINT: saved at the step reached, resumable
  nothing_to_do: bool = False  # the run had already reached the steps asked for: nothing trained or written


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
  a preemption costs no training. The loop keeps at most ``DispatchWindow.LIMIT`` steps in
  flight, so the stop comes within a step or two on every backend (a TPU VM's SIGTERM
  leaves a short grace period). With ``second_ends_process`` (the command line), a second
  signal ends the process at once, without that save: the first one sets the signals'
  default action (the kernel's, which acts even while the process waits inside a
  computation); the checkpoints already saved stay. Otherwise (a notebook, whose kernel
  a second interrupt must not kill) the first restores the previous handlers: a second
  Ctrl-C raises KeyboardInterrupt between steps.

  Installed only in the main thread of a single-process job. With several processes,
  JAX's preemption service (``jax.distributed.initialize``) tells every process, through
  Orbax, to stop at the same step instead.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self, second_ends_process: bool = False):
    self.signum: int | None = None
    self.second_ends_process = second_ends_process
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    if self.second_ends_process:
      for sig in self._previous:
        signal.signal(sig, signal.SIG_DFL)
      then = "stops at once without it (the checkpoints already saved are kept)"
    else:
      self._restore()
      then = "stops without it"
    logging.warning("Received %s: saving a checkpoint after the current step, then stopping. A second %s %s.",
                    signal.Signals(signum).name, "Ctrl-C" if signum == signal.SIGINT else "signal", then)

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
  image_size = config.data.image_size
  encoder = models.make_encoder(config.model, image_size=image_size)
  predictor = models.make_predictor(config.model) if method.uses_predictor else None
  fused = config.model.get("fused_views", False)  # (absent from configs saved before it existed)
  views_encoder = models.make_encoder(config.model, bn_groups=2, image_size=image_size) if fused else None
  views_predictor = models.make_predictor(config.model, bn_groups=2) if fused and predictor is not None else None
  lr_fn = optim.learning_rate_schedule(config.optim, config.train.batch_size, steps_per_epoch, total_steps)
  ema = method.uses_target and method.target_update == "ema"
  momentum_fn = momentum_schedule(config.method.target_momentum, total_steps) if ema else None
  online_lr = target_lr = lr_fn
  if method.target_update == "alternating":
    online_lr, target_lr = (optim.branch_schedule(lr_fn, method.alternate_every, phase) for phase in (0, 1))
  target_tx = None
  if method.uses_target and not ema:
    scale = config.method.get("target_lr_scale", 1.0)  # (absent from configs saved before it existed)
    target_tx = optim.make_optimizer(config.optim, lambda count: scale * target_lr(count), total_steps)
  return StepParts(
      method=method, encoder=encoder, predictor=predictor, views_encoder=views_encoder,
      views_predictor=views_predictor, tx=optim.make_optimizer(config.optim, online_lr, total_steps),
      probe_tx=optax.adam(config.train.probe_lr), momentum_fn=momentum_fn, target_tx=target_tx, lr_fn=lr_fn,
      view1=config.augment.view1, view2=config.augment.view2, image_size=config.data.image_size,
      input_shape=sources.input_shape(config.data), mean=tuple(config.data.mean), std=tuple(config.data.std), num_classes=num_classes)



def state_shapes(parts: StepParts, mesh, sharding_config: ml_collections.ConfigDict | None = None):
  """(the train state's shapes, its sharding on ``mesh``): as ``sharding_config``
  (config.sharding: replicated, fsdp or auto; emim/sharding.py) says, replicated without one."""
  abstract = jax.eval_shape(functools.partial(init_state, parts), jax.random.PRNGKey(0))
  cfg = sharding_config or {}
  rule = cfg.get("params", "replicate")
  return abstract, sharding.state_sharding(abstract, mesh, rule, cfg.get("fsdp_min_mib", 4.0),
                                           cfg.get("auto_fsdp_gib", 2.0))


def sharding_summary(abstract, state_sharding, mesh, sharding_config=None) -> str:
  """One line for the log: the state's size and how it lies, and why, where ``auto`` chose."""
  cfg = sharding_config or {}
  rule, limit_gib = cfg.get("params", "replicate"), cfg.get("auto_fsdp_gib", 2.0)
  mib = sharding.state_bytes(abstract) / 2**20
  if rule == "auto":
    chosen = sharding.resolve_params_rule(rule, abstract, mesh, limit_gib)
    why = ("one device" if mesh.devices.size == 1 else
           f"{'over' if chosen == 'fsdp' else 'within'} sharding.auto_fsdp_gib={limit_gib:g} GiB per device")
    rule = f"auto, so {chosen} ({why})"
  split = sum(s.spec != sharding.P() for s in jax.tree.leaves(state_sharding))
  return (f"{mib:.1f} MiB; sharding.params={rule}: {split} of its {len(jax.tree.leaves(state_sharding))} arrays "
          f"split over the {mesh.devices.size} devices, the rest replicated.")


def lower_train_step(parts: StepParts, data, state, state_sharding, mesh):
  """The train step as the loop compiles it, lowered for ``mesh`` but not compiled:
  ``fn(state, input, interval) -> (state, interval)``, the step (``data.step_fn``: its
  batch gathered on the device, or a streamed batch) followed by folding its metrics into
  the logging interval's (``step_metrics``), so that neither costs a host round trip.
  ``state`` and ``data.example_input()`` may be abstract (``jax.ShapeDtypeStruct``): a
  mesh of another machine's devices compiles it ahead of time (python -m emim.aot).
  Returns (the lowered program, the empty interval as host arrays)."""
  replicated = sharding.replicated(mesh)
  # Jitted on its own so that it is traced once: for the metrics' shapes here, and again
  # (from jit's cache) inside the program below, where it is inlined.
  step = jax.jit(data.step_fn(parts))

  def step_and_accumulate(state, inputs, interval):
    state, metrics = step(state, inputs)
    return state, step_metrics.merge(interval, metrics)

  example = data.example_input()
  # Both traces under the mesh, where the step gathers params split by
  # sharding.params=fsdp where it uses them (train_step._whole): the mesh is part of
  # jit's cache key, so a trace outside it would not be reused inside.
  with jax.set_mesh(mesh):
    _, metric_shapes = jax.eval_shape(step, state, example)
  empty = step_metrics.empty(metric_shapes)  # host arrays: made outside the mesh, whose devices may be compile-only
  interval_sharding = jax.tree.map(lambda _: replicated, empty)
  abstract_empty = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), empty)
  with jax.set_mesh(mesh):
    lowered = jax.jit(
        step_and_accumulate, in_shardings=(state_sharding, data.input_sharding, interval_sharding),
        out_shardings=(state_sharding, interval_sharding), donate_argnums=0).lower(state, example, abstract_empty)
  return lowered, empty


def compile_train_step(parts: StepParts, data, state: TrainState, state_sharding, mesh):
  """The one place the train step is compiled (``lower_train_step``, then compiled for
  this machine's devices). Returns (fn, the empty interval on the devices)."""
  lowered, empty = lower_train_step(parts, data, state, state_sharding, mesh)
  return lowered.compile(), jax.device_put(empty, sharding.replicated(mesh))


# Step metrics that are not loss terms; the progress line shows the rest (the loss, the
# method's own terms, e.g. ld_sum or bt_off_diag) and the online-probe accuracy.
_NOT_TERMS = ("lr", "target_momentum", "grad_norm", "update_norm", "param_norm", "probe_loss", "embedding_std",
              "rank_renyi2", "target_phase", step_metrics.REFUSED, step_metrics.LONGEST)


def device_memory_peak() -> dict:
  """The most memory this process has held on any of its devices, and what JAX's allocator
  lets it hold there, in GiB (``peak_device_memory_gib``, ``device_memory_limit_gib``):
  the measured counterpart of ``python -m emim.aot``'s compiler estimates. Empty where the
  backend keeps no count (a CPU)."""
  peaks = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:  # a backend without the call
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append((int(stats["peak_bytes_in_use"]), int(stats.get("bytes_limit") or 0)))
  if not peaks:
    return {}
  peak, limit = max(peaks)
  return {"peak_device_memory_gib": round(peak / 2**30, 3), **({"device_memory_limit_gib": round(limit / 2**30, 3)}
                                                               if limit else {})}


def is_loss_term(name: str) -> bool:
  """Whether a step metric is one of the objective's terms (what the progress line shows)."""
  return name not in _NOT_TERMS and not name.startswith(("beta_", "rescaled_eig"))


def _format_eta(seconds: float) -> str:
  h, rem = divmod(int(seconds), 3600)
  return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


class ProgressLine:
  """The steady progress line: step, epoch, steps/s and pairs/s of training since the last
  line (time spent in evaluators and checkpoint saves excluded, see ``paused``), ETA, and
  the interval's mean loss terms."""

  def __init__(self, start_step: int, last_step: int, total_steps: int, steps_per_epoch: int, batch_size: int,
               shown: str = ""):
    self.last_step, self.total_steps, self.steps_per_epoch, self.batch_size = last_step, total_steps, steps_per_epoch, batch_size
    self.shown = shown  # config.train.progress_metrics: which terms the line shows (emim.console)
    self._time, self._step, self._paused = time.perf_counter(), start_step, 0.0
    self.paused_total = {}

  @contextlib.contextmanager
  def paused(self, what: str, state=None):
    """Time inside is not training time. ``state`` is waited for first: the steps
    dispatched before are training, whatever this then waits on."""
    if state is not None:
      jax.block_until_ready(state)
    t = time.perf_counter()
    try:
      yield
    finally:
      spent = time.perf_counter() - t
      self._paused += spent
      self.paused_total[what] = self.paused_total.get(what, 0.0) + spent

  def __call__(self, done: int, host_metrics: dict) -> dict:
    """Log the line for step ``done``; returns the rates to record with the metrics."""
    now = time.perf_counter()
    rate = (done - self._step) / max(now - self._time - self._paused, 1e-9)
    self._time, self._step, self._paused = now, done, 0.0
    eta = (self.last_step - done) / max(rate, 1e-9)
    terms = console.values({k: v for k, v in host_metrics.items() if is_loss_term(k)}, self.shown)
    logging.info("step %d/%d epoch %.2f | %.2f steps/s %.0f pairs/s | ETA %s | %s", done, self.total_steps,
                 done / self.steps_per_epoch, rate, rate * self.batch_size, _format_eta(eta), terms)
    return {"epoch": done / self.steps_per_epoch, "steps_per_s": rate, "pairs_per_s": rate * self.batch_size}


def _check_finite(state: TrainState, host_metrics: dict, done: int, config: ml_collections.ConfigDict,
                  checkpointer: ckpt_lib.Checkpointer) -> None:
  """Refused updates are reported with the progress line; a run of
  ``max_nonfinite_in_a_row`` of them since the last line stops the run (the parameters
  are still the last finite ones)."""
  refused = int(host_metrics.get(step_metrics.REFUSED, 0))
  longest = int(host_metrics.get(step_metrics.LONGEST, 0))
  now = int(state.refused_in_a_row)
  limit = config.train.max_nonfinite_in_a_row
  if refused:
    logging.warning("%d update(s) refused as non-finite in the steps up to %d (at most %d in a row; the run stops at "
                    "%d).", refused, done, longest, limit)
  if longest >= limit:
    kept = f"those of step {done - now}" if now else "those of a later, finite step (the run recovered since)"
    raise FloatingPointError(
        f"{longest} updates in a row were refused, up to step {done}: the loss, gradient or update was not finite. "
        f"The parameters are {kept}, and every checkpoint in {checkpointer.directory} holds finite ones: lower "
        "--config.optim.base_lr (or set --config.optim.clip_norm, or raise the objective's eps) and run the same "
        f"command to resume from the latest. --config.train.max_nonfinite_in_a_row={limit} sets how many refusals "
        "in a row stop a run (checked at each progress line).")


def _take_lock(lock: workdir_lib.WorkdirLock | None) -> None:
  """Process 0 takes the work directory's lock, and every process learns whether it did:
  a refused job stops in all its processes at once, not at their first collective."""
  refused = None
  if lock is not None:
    try:
      lock.acquire()
    except Exception as e:  # busy, or the work directory unreachable: every process stops
      refused = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    if not int(multihost_utils.broadcast_one_to_all(np.int32(refused is None))) and refused is None:
      raise workdir_lib.WorkdirBusy("Process 0 of this job could not take the work directory's lock; its log says why.")
  if refused is not None:
    raise refused


def restore_or_init(config: ml_collections.ConfigDict, checkpointer: ckpt_lib.Checkpointer, abstract_state, data):
  """The state to start from, with the data iterator positioned to match it: the run's own
  latest checkpoint (or ``checkpoint.restore_step``), else the checkpoint of the run named
  by ``checkpoint.init_from`` (a fork), else None (a fresh start)."""
  restore_step = None if config.checkpoint.restore_step < 0 else config.checkpoint.restore_step
  source = checkpointer
  if checkpointer.latest_step() is not None:
    ckpt_lib.check_can_continue(checkpointer, restore_step)
  elif config.checkpoint.init_from:
    source = ckpt_lib.Checkpointer(fs.as_path(config.checkpoint.init_from) / "checkpoints", read_only=True)
  elif restore_step is not None:
    raise ckpt_lib.CheckpointError(
        f"--config.checkpoint.restore_step={restore_step}, but {checkpointer.directory} holds no checkpoint. To start "
        "from another run's step, add --config.checkpoint.init_from=THAT_RUNS_WORKDIR.")
  else:
    return None
  try:
    ckpt_lib.check_same_structure(source.directory, restore_step, json.loads(config.to_json_best_effort()))
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


class StepProfiler:
  """A ``jax.profiler`` trace of steps ``first`` to ``last`` (config.train.profile_steps,
  1-based, inclusive), each step annotated for the profile's step view, into
  ``workdir/profile`` (staged locally and uploaded for a remote work directory); for
  xprof or TensorBoard's profile plugin."""

  def __init__(self, steps, workdir: fs.Path, start_step: int = 0, last_step: int | None = None):
    """Steps outside (start_step, last_step], the steps this call trains, are said and
    clipped: a trace asked for past the end would otherwise silently never start."""
    self.first, self.last = tuple(steps)
    self._workdir, self._tracing = workdir, False
    self._dir = self._traced_last = None
    if self.last and last_step is not None:
      if self.first > last_step or self.last <= start_step:
        logging.warning("--config.train.profile_steps=%s: this run trains steps %d to %d; nothing is traced.",
                        (self.first, self.last), start_step + 1, last_step)
        self.first = self.last = 0
      elif self.first <= start_step or self.last > last_step:
        clipped = (max(self.first, start_step + 1), min(self.last, last_step))
        logging.warning("--config.train.profile_steps=%s: this run trains steps %d to %d; tracing %s.",
                        (self.first, self.last), start_step + 1, last_step, clipped)
        self.first, self.last = clipped

  def step(self, done: int):
    """The context to run step ``done`` in: the trace starts before step ``first``."""
    if self.last and done == self.first:
      remote = fs.is_remote(self._workdir)
      self._dir = fs.staging_dir("profile") if remote else os.fspath(self._workdir / "profile")
      jax.profiler.start_trace(self._dir)
      self._tracing = True
    if self._tracing:
      return jax.profiler.StepTraceAnnotation("train", step_num=done)
    return contextlib.nullcontext()

  def after(self, done: int, state) -> None:
    if self._tracing and done >= self.last:
      jax.block_until_ready(state)  # the traced steps, finished
      self.close()

  def close(self) -> None:
    if not self._tracing:
      return
    jax.profiler.stop_trace()
    self._tracing = False
    target = self._workdir / "profile"
    if fs.is_remote(self._workdir):
      for root, _, files in os.walk(self._dir):
        for name in files:
          local = os.path.join(root, name)
          dest = target / os.path.relpath(local, self._dir)
          dest.parent.mkdir(parents=True, exist_ok=True)
          with open(local, "rb") as f:
            fs.atomic_write_bytes(dest, f.read())
      shutil.rmtree(self._dir, ignore_errors=True)
    logging.info("Profile of steps %d to %d written to %s (xprof, or tensorboard --logdir with the profile "
                 "plugin).", self.first, self.last, target)


class DispatchWindow:
  """At most ``limit`` steps in flight besides the one being dispatched: after each
  dispatch, wait for the step ``limit`` steps back (``None``: no limit, asynchronous
  dispatch as JAX does it).

  The loop dispatches up to a progress line ahead. Unbounded, the host would queue a
  whole progress interval of steps and then wait for all of them: a stop (Ctrl-C, a
  preemption's SIGTERM) is acted on only when the host gets back to Python, so it waited
  for the whole interval (9 minutes on a CPU run of configs/cifar10.py). With ``LIMIT``
  steps in flight it waits for at most that many, on every backend; two keep an
  accelerator fed (the host dispatches the next step while the device runs the last).

  A CPU backend with several devices needs a bound for a second reason. XLA's CPU client
  runs a program of several devices by handing each device's launch to a pool of
  max(cores, devices) threads, and a launch waits there, holding its thread, while its
  device already has 32 computations in flight; the computations in flight need pool
  threads to run. With some 40 steps dispatched ahead, the pool's threads all hold
  waiting launches or participants of a collective whose other participants can no
  longer get a thread: a deadlock (benchmarks/xla_cpu_inflight_deadlock.py reproduces it
  in a second, with every thread's stack; the 8-device test suite on 2 cores hung on it
  in 3 of 4 runs). Up to ``CPU_LIMIT`` steps in flight never deadlocked there."""

  LIMIT = 2
  CPU_LIMIT = 8  # the most a multi-device CPU run may keep in flight (LIMIT is below it)

  def __init__(self, limit: int | None):
    self.limit = limit
    self._pending = collections.deque()

  @classmethod
  def for_backend(cls) -> "DispatchWindow":
    return cls(cls.LIMIT)

  def dispatched(self, outputs) -> None:
    """Record a dispatched step by its outputs (not donated to the next step); wait for
    the oldest when more than ``limit`` are in flight."""
    if self.limit is None:
      return
    self._pending.append(outputs)
    if len(self._pending) > self.limit:
      jax.block_until_ready(self._pending.popleft())


def _log_parameter_overview(state: TrainState) -> None:
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.params)
  logging.info("Parameters:\n%s", parameter_overview.get_parameter_overview(shapes, include_stats=False))


def run(config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None,
        second_signal_ends_process: bool = False) -> RunResult:
  """Train (or resume) the run in ``workdir``.

  Args:
    config: the experiment config (configs/*.py).
    workdir: a local directory or a remote one (``gs://bucket/run``); checkpoints,
      config.json and metrics.jsonl go here (process 0 writes the files).
    stop_at_step: stop (with a checkpoint) after this many steps, as a preemption would;
      the schedule is still that of the full run, which a later call resumes.
    second_signal_ends_process: after a first SIGINT/SIGTERM (a stop with a checkpoint),
      a second one ends the process at once (the command line); else it raises
      KeyboardInterrupt in the loop (a notebook keeps its kernel). See ``StopRequest``.
  """
  config_base.validate(config)
  workdir = fs.as_path(workdir)
  writes_files = workdir_lib.writes_files()
  timings = {}
  with contextlib.ExitStack() as cleanup:  # closed on every exit path, in reverse order
    # One job per work directory: refused here, before any work, while another lives.
    lock = workdir_lib.WorkdirLock(workdir) if writes_files else None
    _take_lock(lock)
    if lock is not None:
      cleanup.callback(lock.release)

    # --- Mesh ------------------------------------------------------------------------
    _check_deterministic(config)
    mesh = sharding.make_mesh()
    sharding.check_batch_size(config.train.batch_size, mesh)

    # --- Data: on the devices (CIFAR) or streamed from host workers (ImageNet) -------
    t0 = time.perf_counter()
    data = make_train_data(config, mesh, fs.local_cache_dir(workdir))
    timings["decode_s"] = time.perf_counter() - t0
    batch_size = config.train.batch_size
    steps_per_epoch = data.num_examples // batch_size
    if steps_per_epoch == 0:
      raise config_base.ConfigError(
          f"The training set has {data.num_examples} images, fewer than one batch of {batch_size}: lower "
          "--config.train.batch_size.")
    total_steps = config.train.num_steps or config.train.num_epochs * steps_per_epoch
    logging.info("Data: %d images in %d classes, %d steps/epoch, %d steps.", data.num_examples, data.num_classes,
                 steps_per_epoch, total_steps)

    # --- State, created sharded, or restored ------------------------------------------
    parts = build_parts(config, data.num_classes, steps_per_epoch, total_steps)
    rng = jax.random.PRNGKey(config.seed)
    init_fn = functools.partial(init_state, parts)
    # What the programs below are a function of, besides their inputs' shapes: a second
    # run of this config in this process reuses them (emim.compiled).
    program_key = compiled.key_of(config.to_json_best_effort(sort_keys=True), data.num_classes, steps_per_epoch,
                                  total_steps, [d.id for d in mesh.devices.flat], str(mesh))
    abstract, state_sharding = compiled.once("state_shapes", program_key, lambda: state_shapes(parts, mesh, config.get("sharding")))
    logging.info("Train state: %s", sharding_summary(abstract, state_sharding, mesh, config.get("sharding")))
    checkpointer = cleanup.enter_context(contextlib.closing(ckpt_lib.Checkpointer(
        workdir / "checkpoints", config.checkpoint.every_steps, config.checkpoint.keep, config.checkpoint.async_save)))
    last_step = total_steps if stop_at_step is None else min(stop_at_step, total_steps)
    latest = checkpointer.latest_step()
    if latest is not None and latest >= last_step and config.checkpoint.restore_step < 0:
      # A finished run asked for no more steps: say so, compile nothing, write nothing
      # (its config.json and timings.json stay those of the run).
      asked = (f"--stop_at_step={stop_at_step}" if last_step == stop_at_step else
               f"{total_steps} steps" + (f" (--config.train.num_steps={config.train.num_steps})"
                                         if config.train.num_steps else ""))
      logging.warning("%s already finished at step %d; this command asks for %s: nothing to train, no file changed. "
                      "To train longer, raise --config.train.num_steps (or num_epochs); to evaluate it: python -m "
                      "emim.evaluate --workdir=%s", workdir, latest, asked, workdir)
      state, _ = checkpointer.restore(ckpt_lib.abstract_like(abstract, state_sharding))
      return RunResult(state=state, final_metrics={}, timings={}, nothing_to_do=True)
    state = restore_or_init(config, checkpointer, ckpt_lib.abstract_like(abstract, state_sharding), data)
    if state is None:
      state = compiled.once("init_state", program_key,
                            lambda: jax.jit(init_fn, out_shardings=state_sharding).lower(rng).compile())(rng)
    start_step = int(state.step)
    if writes_files:
      _log_parameter_overview(state)

    # --- Evaluators, built before compiling: a missing test split is reported at once --
    logging.info("Compiling the evaluators' and the train step's programs (once; a ResNet takes a while on a CPU).")
    t0 = time.perf_counter()
    evaluators = make_evaluators(config, EvalContext(parts, data, mesh, state, program_key))
    timings["eval_setup_s"] = time.perf_counter() - t0

    # --- The step, compiled once ahead of time ----------------------------------------
    t0 = time.perf_counter()
    step_key = compiled.key_of(program_key, type(data).__name__, compiled.signature(data.example_input()),
                               str(data.input_sharding))
    step_fn, empty_interval = compiled.once(
        "train_step", step_key, lambda: compile_train_step(parts, data, state, state_sharding, mesh))
    timings["compile_s"] = time.perf_counter() - t0
    # The step and the evaluators are compiled: hosts start stepping together, whatever
    # each one's compile time was.
    ckpt_lib.sync_processes("emim_compiled")

    # --- Training starts: record what it trains with ------------------------------------
    config_dict = json.loads(config.to_json_best_effort())
    if writes_files:
      workdir_lib.record_config(workdir, config.to_json_best_effort(indent=2))
      workdir_lib.write_json(workdir / workdir_lib.CLASSES_FILE, {"train": list(data.class_names)})
      # Written now and again at the end, so a run stopped early still tells its set-up costs.
      workdir_lib.write_json(workdir / workdir_lib.TIMINGS_FILE, timings)
    # A fresh start (step 0) writes every line again, its step-0 estimates included.
    writer = cleanup.enter_context(contextlib.closing(MetricWriter(
        workdir, active=writes_files, resume_step=start_step or -1,
        wandb_project=config.train.get("wandb_project", ""), wandb_config=config_dict)))

    shown = config.train.get("progress_metrics", "")  # which values the console's lines show (emim.console)

    seen_names: set[str] = set()  # every value's name so far, to check progress_metrics against

    def evaluate(evaluator, step):
      t = time.perf_counter()
      metrics = evaluator.run(state)
      seen_names.update(metrics)
      logging.info("step %d | %s (%.1fs): %s", step, evaluator.name, time.perf_counter() - t,
                   console.values(metrics, shown))
      writer.write(step, metrics)
      return metrics

    # --- Loop -------------------------------------------------------------------------
    if writes_files and shown != "all":
      logging.info("The progress lines show %s; %s holds every value (--config.train.progress_metrics=all shows "
                   "them; docs/outputs.md says what each means).",
                   ", ".join(console.requested(shown) or console.SHOWN[:3]) + ("" if shown else ", ..."),
                   workdir / "metrics.jsonl")
    names_checked = not console.requested(shown)
    final = {}
    # From here a stop (Ctrl-C, SIGTERM) is a request the loop honours between steps;
    # before, nothing of this start is worth saving and KeyboardInterrupt ends it.
    stop = cleanup.enter_context(StopRequest(second_signal_ends_process))
    if start_step == 0:
      for evaluator in evaluators:
        if evaluator.at_start:
          final.update(evaluate(evaluator, 0))
    if stop.signum is not None:
      logging.warning("Stopped before the first step of this start: nothing new to save%s. Run the same command to "
                      "%s.", f" (the checkpoint of step {start_step} is kept)" if start_step else "",
                      "resume" if start_step else "start")
      last_step = start_step
    log_every = config.train.log_every
    interval = empty_interval
    t_train = time.perf_counter()
    progress = ProgressLine(start_step, last_step, total_steps, steps_per_epoch, batch_size, shown)
    first_steps = console.FirstSteps(start_step, last_step, total_steps, jax.default_backend())
    profiler = StepProfiler(config.train.profile_steps if writes_files else (0, 0), workdir, start_step, last_step)
    cleanup.callback(profiler.close)
    in_flight = DispatchWindow.for_backend()
    for step in range(start_step, last_step):
      done = step + 1
      with profiler.step(done):
        state, interval = step_fn(state, data.next_input(), interval)
      in_flight.dispatched(interval)
      profiler.after(done, state)
      first_steps.after(done, state)
      if done % log_every == 0 or done == last_step:
        host = step_metrics.compute(interval)
        interval = empty_interval
        writer.write(done, {**host, **progress(done, host)})
        _check_finite(state, host, done, config, checkpointer)
        if lock is not None:
          lock.check()
        final = dict(host)
        seen_names.update(host)
      for evaluator in evaluators:
        if evaluator_due(evaluator, done, last_step):
          with progress.paused("evaluators_s", state):
            final.update(evaluate(evaluator, done))
      if not names_checked and seen_names and (done % log_every == 0 or done == last_step):
        names_checked = True
        if warning := console.unknown_names(shown, seen_names):
          logging.warning("%s", warning)
      preempted = stop.signum is not None or checkpointer.reached_preemption(done)
      force = preempted or done == last_step
      if force or checkpointer.due(done):
        with progress.paused("checkpoint_s", state):
          checkpointer.save(done, state, data.iterator, force=force, config=config_dict)
      if preempted:
        logging.warning("Stopped at step %d of %d; the checkpoint is in %s. Run the same command to resume.",
                        done, total_steps, checkpointer.directory)
        break
    timings["train_s"] = time.perf_counter() - t_train
    timings.update(progress.paused_total)  # spent inside train_s, not counted in steps/s
    logging.info("Timings: decode %.1fs, evaluator set-up %.1fs, compile %.1fs, train %.1fs (evaluators %.1fs, "
                 "checkpoint saves %.1fs).", timings["decode_s"], timings["eval_setup_s"], timings["compile_s"],
                 timings["train_s"], timings.get("evaluators_s", 0.0), timings.get("checkpoint_s", 0.0))
    if memory := device_memory_peak():
      timings.update(memory)
      limit = memory.get("device_memory_limit_gib")
      logging.info("Device memory: at most %.2f GiB held on a device%s (python -m emim.aot estimates it before a run).",
                   memory["peak_device_memory_gib"], f" of the {limit:.2f} GiB JAX may use there" if limit else "")
    if writes_files:  # while the lock is held
      workdir_lib.write_json(workdir / workdir_lib.TIMINGS_FILE, timings)
      logging.info(console.summary(str(workdir), int(state.step), total_steps, int(state.step) < total_steps,
                                   metric_writer.EventFileWriter is not None,
                                   by_stop_at_step=stop.signum is None and stop_at_step is not None))
  return RunResult(state=state, final_metrics={k: float(np.asarray(v)) for k, v in final.items()}, timings=timings,
                   stopped_by_signal=stop.signum)
