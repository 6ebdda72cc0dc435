"""Every Orbax call of emim lives here.

A checkpoint step holds up to three items:
  ``state``   the train state pytree (params, batch statistics, optimiser, EMA target, ...);
  ``config``  the config the run trained with when it saved this step (JSON), so that the
              evaluation and the export rebuild the model this checkpoint holds;
  ``data``    the Grain iterator's state, one JSON file per process, when the run streams
              its data (in-memory data has no iterator: its order is a function of the step).

Resume order: the run's own work directory (latest checkpoint, or ``restore_step``), else
another run's checkpoints named by ``init_from`` (a fork), else a fresh state.
Checkpoints are saved asynchronously every ``every_steps`` steps and at the end, the
newest ``keep`` kept. A checkpoint that cannot be read is reported with its path and left
in place: nothing already saved is deleted.
"""

from __future__ import annotations

import json
import logging
import threading
import time

import grain  # its iterator handler registers with Orbax on import
import jax
import orbax.checkpoint as ocp

from emim import fs
from emim.errors import UserError, is_disk_full

STATE_ITEM = "state"
CONFIG_ITEM = "config"
DATA_ITEM = "data"


# Orbax's warnings about options emim sets on purpose: a read-only manager (evaluation,
# export, a fork's source) "setting save_interval_steps=0", "setting create=False".
_CHOSEN_OPTION_WARNINGS = ("read_only=True, setting", "Given directory is read only")
# Orbax's error on listing a step that a run still training deleted meanwhile (keep):
# the listing goes on without it.
_DELETED_STEP_ERRORS = ("Failed to read Metadata file",)


class _OrbaxInfoFilter(logging.Filter):
  """Drops the INFO chatter of Orbax's every save and restore, its warnings about the
  options emim chose (other warnings pass), and its tracebacks of a save that failed on
  a full disk (``Checkpointer.save`` reports that in one line)."""

  def filter(self, record):
    if "orbax" not in record.pathname:
      return True
    if record.levelno >= logging.ERROR and _says_disk_full(record):
      return False
    message = record.getMessage()
    if message.startswith(_DELETED_STEP_ERRORS) and "No such file or directory" in message:
      return False
    return record.levelno >= logging.WARNING and not any(w in record.getMessage() for w in _CHOSEN_OPTION_WARNINGS)


def _says_disk_full(record: logging.LogRecord) -> bool:
  if record.exc_info and record.exc_info[1] is not None and is_disk_full(record.exc_info[1]):
    return True
  return is_disk_full(Exception(record.getMessage()))


class _AbandonedOrbaxTasks(logging.Filter):
  """asyncio's "Task (or Future) exception was never retrieved" for the Orbax coroutines
  and TensorStore futures a failed save or restore left behind (one traceback per array);
  the error itself is reported once."""

  def filter(self, record):
    message = record.getMessage()
    return not (message.startswith(("Task exception was never retrieved", "Future exception was never retrieved"))
                and any(w in message for w in ("orbax", "OCDBT", "TensorStore", "tensorstore")))


def quiet_orbax_logs() -> None:
  """Keep the programs' logs readable: progress lines, not Orbax's I/O statistics. On
  the "absl" logger itself, so that every handler (absl's, or the root logger's that
  prints "WARNING:absl:") sees the filtered records; once, however often called. Also
  drops the asyncio leftovers of a failed read or write (``drop_orbax_asyncio_leftovers``)."""
  logger = logging.getLogger("absl")
  if not any(isinstance(f, _OrbaxInfoFilter) for f in logger.filters):
    logger.addFilter(_OrbaxInfoFilter())
  asyncio_logger = logging.getLogger("asyncio")
  if not any(isinstance(f, _AbandonedOrbaxTasks) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_AbandonedOrbaxTasks())
  drop_orbax_asyncio_leftovers()


def _is_asyncio_leftover(exc_type, exc, tb) -> bool:
  """A TensorStore future's callback scheduling onto the event loop of an Orbax call that
  has already ended (it ended with the error the program reports): asyncio's
  ``RuntimeError('Event loop is closed')`` raised in ``call_soon_threadsafe``."""
  if exc_type is not RuntimeError or str(exc) != "Event loop is closed":
    return False
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return tb is not None and tb.tb_frame.f_code.co_filename.endswith(("asyncio/base_events.py", "asyncio\\base_events.py"))


def _is_orbax_coroutine(obj) -> bool:
  """A coroutine of Orbax or TensorStore that an error left unfinished, collected (with
  "coroutine ... was never awaited" or an error of interpreter shutdown)."""
  code = getattr(obj, "cr_code", None)
  name = getattr(code, "co_filename", "") or ""
  return any(part in name for part in ("/orbax/", "/tensorstore/", "\\orbax\\", "\\tensorstore\\"))


def drop_orbax_asyncio_leftovers() -> None:
  """When an Orbax read or write fails (a damaged checkpoint, a full disk), TensorStore's
  callbacks still arrive for the event loop Orbax ran it on, after that loop closed, and
  the coroutines still pending are collected: each prints a traceback ("RuntimeError:
  Event loop is closed", "Exception ignored in: <coroutine ...>"), thousands of lines
  around the one-line error the program gives. Only those two kinds are dropped, by
  wrapping ``sys.excepthook`` (which TensorStore's threads report through) and
  ``sys.unraisablehook``; everything else prints as before. Each hook is wrapped once,
  and wrapped again if something replaced it since (a notebook, a test harness)."""
  import sys

  if not getattr(sys.excepthook, "drops_orbax_leftovers", False):
    previous_excepthook = sys.excepthook

    def excepthook(exc_type, exc, tb):
      # TensorStore reports its callbacks' errors from its own (non-Python) threads; the
      # same error in the main thread is the program's own, and prints.
      if threading.current_thread() is threading.main_thread() or not _is_asyncio_leftover(exc_type, exc, tb):
        previous_excepthook(exc_type, exc, tb)

    excepthook.drops_orbax_leftovers = True
    sys.excepthook = excepthook
  if not getattr(sys.unraisablehook, "drops_orbax_leftovers", False):
    previous_unraisablehook = sys.unraisablehook

    def unraisablehook(unraisable):
      leftover = _is_orbax_coroutine(unraisable.object) or (
          unraisable.exc_type is not None and _is_asyncio_leftover(unraisable.exc_type, unraisable.exc_value,
                                                                   unraisable.exc_traceback))
      if not leftover:
        previous_unraisablehook(unraisable)

    unraisablehook.drops_orbax_leftovers = True
    sys.unraisablehook = unraisablehook


# On import: every program that opens checkpoints through this module (emim.plots, the MI
# experiments, a notebook), not only those that ask, whose own lines Orbax's chatter
# (a hundred lines a restore) would bury.
quiet_orbax_logs()


class CheckpointError(UserError, RuntimeError):
  """A checkpoint that cannot be restored; the message names the path and the fix."""


class Checkpointer:
  """A thin wrapper over ``ocp.CheckpointManager`` for the train state and, when the
  data streams, the data iterator."""

  def __init__(self, directory: fs.PathLike, every_steps: int = 1000, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = fs.as_path(directory)
    if read_only and not self.directory.is_dir():
      raise CheckpointError(f"No checkpoints in {self.directory}: is this a training run's work directory?")
    # Every ``every_steps`` steps and at a preemption; not Orbax's default "initial save"
    # as well, which wrote a checkpoint at step 1 of every fresh run.
    policies = ocp.checkpoint_managers
    save_policy = policies.AnySavePolicy([policies.FixedIntervalPolicy(max(1, every_steps)),
                                          policies.PreemptionCheckpointingPolicy()])
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_decision_policy=save_policy, enable_async_checkpointing=async_save,
        create=not read_only, read_only=read_only)
    self._manager = (_open_manager(self.directory, options=options) if read_only else
                     ocp.CheckpointManager(self.directory, options=options))
    self._last_save = None

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def has_data_state(self, step: int) -> bool:
    return (self.directory / str(step) / DATA_ITEM).is_dir()

  def restore(self, abstract_state, step: int | None = None, data_iterator=None):
    """(state, data_restored) at ``step`` (default latest), the state with the shardings of
    ``abstract_state``; (None, False) when there is no checkpoint.

    With ``data_iterator`` (a Grain ``DatasetIterator``), its position is set from the
    checkpoint too, when the checkpoint has one; ``data_restored`` says whether it had.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      return None, False
    if step not in self.all_steps():
      raise CheckpointError(f"No checkpoint at step {step} in {self.directory}; available: {self.all_steps()}.")
    items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
    with_data = data_iterator is not None and self.has_data_state(step)
    if with_data:
      items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
      raise CheckpointError(self._unreadable(step, e)) from e
    return restored[STATE_ITEM], with_data

  def _unreadable(self, step: int, error: Exception) -> str:
    """What to do about a checkpoint that cannot be read: nothing is deleted, and training
    on from an earlier step in this directory would be refused (its later steps exist),
    so the fixes are a fork or moving the step aside by hand."""
    path = self.directory / str(step)
    earlier = [s for s in self.all_steps() if s < step]
    fork = (f" To continue from step {earlier[-1]}, fork it: --workdir=NEW_DIR "
            f"--config.checkpoint.init_from={self.directory.parent} --config.checkpoint.restore_step={earlier[-1]}; "
            f"or move {path} aside (e.g. to {path}.corrupt) and run the same command." if earlier else
            " No earlier checkpoint exists: start in a new --workdir.")
    text = " ".join(str(error).split())  # (TensorStore's errors span lines: the message is one)
    detail = text if len(text) <= 300 else text[:300] + " ..."
    return (f"Cannot restore the checkpoint at {path}; it is left as it is.{fork} (A config that changed the model "
            f"or method since the checkpoint was written also fails here: run with the config in its config.json.) "
            f"The error: {type(error).__name__}: {detail}")

  def reached_preemption(self, step: int) -> bool:
    """Whether JAX's preemption service (multi-process jobs) asks every process to save
    and stop at ``step``; False when the service is not running."""
    return self._manager.reached_preemption(step)

  def due(self, step: int) -> bool:
    """Whether the save interval (or a preemption) asks for a checkpoint at ``step``."""
    return self._manager.should_save(step)

  def save(self, step: int, state, data_iterator=None, force: bool = False, config: dict | None = None) -> bool:
    """Save when the interval says so (or ``force``); returns whether it saved. The data
    iterator's position is read now, synchronously, so it matches ``state``; ``config``
    (a JSON-able dict) is the config the run trains with."""
    items = {STATE_ITEM: ocp.args.StandardSave(state)}
    if config is not None:
      items[CONFIG_ITEM] = ocp.args.JsonSave(config)
    if data_iterator is not None:
      items[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iterator)
    try:
      saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # this save failed, or (asynchronous saves) the previous one
      self._raise_if_disk_full(e, step)
      raise
    if saved:
      self._last_save = step
    return saved

  def _raise_if_disk_full(self, error: Exception, step: int) -> None:
    if not is_disk_full(error):
      return
    complete = self.all_steps()
    raise CheckpointError(
        f"The disk holding {self.directory} is full (No space left on device): a checkpoint save failed (reported at "
        f"step {step}). Nothing already saved was lost: " +
        (f"the run resumes from step {complete[-1]}, its newest complete checkpoint. " if complete else "") +
        "Free space on that disk (or lower --config.checkpoint.keep, or move the work directory to a disk with "
        "room) and run the same command.") from error

  def close(self):
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # an asynchronous save that failed
      self._manager.close()
      self._raise_if_disk_full(e, self._last_save)
      raise
    self._manager.close()


def sync_processes(name: str, timeout_s: int = 3600) -> None:
  """Wait until every process gets here (a no-op with one). A barrier of JAX's coordination
  service, not a device collective: a host still compiling while the others wait is no
  error (CPU collectives give up after 30 s). ``name`` must be new to the job."""
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(name, timeout=timeout_s)


# The config fields that decide the shapes of the saved state.
STRUCTURE_FIELDS = (("model", "backbone"), ("model", "width"), ("model", "cifar_stem"), ("model", "projector_dims"),
                    ("model", "predictor_dims"), ("method", "name"))


def check_same_structure(directory: fs.PathLike, step: int | None, config: dict) -> None:
  """Refuse, before restoring, a config whose model or method is not the one checkpoint
  ``step`` (the latest by default) was saved with, naming the fields that differ (a
  checkpoint saved before checkpoints held their config is not checked)."""
  try:
    step, saved = restore_config(directory, step)
  except CheckpointError as e:  # the restore itself reports what is wrong with the checkpoint
    logging.warning("Not comparing the config with the checkpoint's: %s", e)
    return
  if saved is None:
    return
  get = lambda cfg, path: cfg.get(path[0], {}).get(path[1])
  norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v
  differ = [f"{a}.{b}: {norm(get(saved, (a, b)))!r} in the checkpoint, {norm(get(config, (a, b)))!r} now"
            for a, b in STRUCTURE_FIELDS if norm(get(saved, (a, b))) != norm(get(config, (a, b)))]
  if differ:
    raise CheckpointError(
        f"The checkpoint {fs.as_path(directory) / str(step)} holds another model than this config describes "
        f"({'; '.join(differ)}). Run with the config it was trained with (its config.json, or "
        "--config.<field>= overrides that match), or train the new model in a new --workdir.")


def abstract_like(tree, shardings):
  """ShapeDtypeStructs with shardings: what ``restore`` fills in."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def check_can_continue(checkpointer: Checkpointer, restore_step: int | None) -> None:
  """Training on from an earlier step of a run whose later checkpoints exist would mix two
  histories in one directory (and Orbax would skip saving over the later steps): refuse,
  and say how to fork instead. Nothing is deleted."""
  if restore_step is None:
    return
  later = [s for s in checkpointer.all_steps() if s > restore_step]
  if later:
    raise CheckpointError(
        f"{checkpointer.directory} has checkpoints after step {restore_step} ({later}); training on from "
        f"{restore_step} there would mix two runs. Fork it into a new work directory instead: "
        f"--workdir=NEW_DIR --config.checkpoint.init_from={checkpointer.directory.parent} "
        f"--config.checkpoint.restore_step={restore_step}. (To evaluate step {restore_step}, use "
        f"python -m emim.evaluate --checkpoint_step={restore_step}.)")


def _open_manager(directory: fs.Path, tries: int = 5, **kwargs) -> ocp.CheckpointManager:
  """A read-only ``ocp.CheckpointManager``. Orbax lists the steps as it opens, reading each
  step's time; a run still training there deletes its older steps meanwhile (``keep``),
  and a step gone between the listing and the read raises FileNotFoundError: list again."""
  for attempt in range(tries):
    try:
      return ocp.CheckpointManager(directory, **kwargs)
    except FileNotFoundError:
      if attempt == tries - 1 or not directory.is_dir():
        raise
      time.sleep(0.05 * (attempt + 1))


def _single_device():
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _read_only_manager(directory: fs.Path, step: int | None):
  """(manager, step): a read-only manager over ``directory`` and the step it holds (the
  latest when ``step`` is None); a clear error when there is none."""
  if not directory.is_dir():
    raise CheckpointError(f"No checkpoints in {directory}: train first, or point --workdir at a training run.")
  manager = _open_manager(
      directory, item_handlers={STATE_ITEM: ocp.PyTreeCheckpointHandler(), CONFIG_ITEM: ocp.JsonCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step() if step is None else step
  if step is None or step not in manager.all_steps():
    available = sorted(manager.all_steps())
    manager.close()
    if not available:
      raise CheckpointError(f"No checkpoint in {directory}: train first, or point --workdir at a training run.")
    raise CheckpointError(f"No checkpoint at step {step} in {directory}; available steps: {available}.")
  return manager, step


def latest_step(directory: fs.PathLike) -> int | None:
  """The newest finished checkpoint step in ``directory`` (None when there is none)."""
  directory = fs.as_path(directory)
  if not directory.is_dir():
    return None
  manager = _open_manager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    return manager.latest_step()
  finally:
    manager.close()


def restore_config(directory: fs.PathLike, step: int | None, tries: int = 3) -> tuple[int, dict | None]:
  """(step, the config saved with that checkpoint), the latest step by default; the
  config is None for a checkpoint written before checkpoints held their config. The
  latest is read again when a run still training deletes it meanwhile (see
  ``restore_subtree``)."""
  directory = fs.as_path(directory)
  for attempt in range(tries):
    manager, chosen = _read_only_manager(directory, step)
    try:
      if not (manager.directory / str(chosen) / CONFIG_ITEM).is_dir():
        return chosen, None
      restored = manager.restore(chosen, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()}))
      return chosen, json.loads(json.dumps(restored[CONFIG_ITEM]))
    except Exception as e:
      if step is None and attempt < tries - 1 and deleted_soon(directory / str(chosen)):
        continue  # deleted by the run still saving: read the latest again
      raise CheckpointError(f"Cannot read the config saved in {directory}/{chosen} ({type(e).__name__}: {e}).") from e
    finally:
      manager.close()


def restore_subtree(directory: fs.PathLike, step: int | None, keys: tuple[str, ...] | None, tries: int = 3):
  """Only ``keys`` of a saved state (e.g. params and batch_stats for evaluation; None:
  every saved field), on the default device, from the latest or a given step, without
  building the full state.

  A run still training in ``directory`` deletes its older checkpoints as it saves new
  ones (``checkpoint.keep``), possibly the one being read: the latest is then read again,
  up to ``tries`` times; a step asked for by number is reported as deleted, not as
  corrupt."""
  directory = fs.as_path(directory)
  for attempt in range(tries):
    manager, chosen = _read_only_manager(directory, step)
    try:
      restored = _restore_keys(manager, chosen, keys)
    except Exception as e:
      if not deleted_soon(directory / str(chosen)):  # still there: it cannot be read
        others = [s for s in manager.all_steps() if s != chosen]
        choose = (f" Evaluate another with --checkpoint_step (this run has {others[-5:]})." if others else
                  " It is the run's only checkpoint.")
        text = " ".join(str(e).split())
        detail = text if len(text) <= 300 else text[:300] + " ..."
        raise CheckpointError(f"Cannot read {keys} from the checkpoint at {directory / str(chosen)}: it is truncated "
                              f"or corrupt.{choose} The error: {type(e).__name__}: {detail}") from e
      if step is not None or attempt == tries - 1:
        raise CheckpointError(
            f"The checkpoint at {directory / str(chosen)} was deleted while it was being read, by the job still "
            f"training there (it keeps its newest --config.checkpoint.keep). Evaluate the latest "
            f"(--checkpoint_step=-1), a newer step ({_steps_now(directory)}), or after the run ends.") from e
      logging.info("The checkpoint of step %d was deleted while being read (the run is still saving); reading the "
                   "latest again.", chosen)
      continue
    finally:
      manager.close()
    logging.info("Restored %s from %s at step %d.", keys, directory, chosen)
    return chosen, restored


def deleted_soon(path: fs.Path, wait_s: float = 1.0) -> bool:
  """Whether a checkpoint that failed to read is gone, or goes within ``wait_s``: a run
  still training deletes an old step (``keep``) file by file, so a read can fail while
  its folder is still there."""
  deadline = time.monotonic() + wait_s
  while path.exists():
    if time.monotonic() > deadline:
      return False
    time.sleep(0.05)
  return True


def _steps_now(directory: fs.Path) -> list[int]:
  try:
    manager = _open_manager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
  except Exception:  # reporting another error: list none rather than raise a third
    return []
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def _restore_keys(manager, step: int, keys: tuple[str, ...] | None):
  metadata = manager.item_metadata(step)[STATE_ITEM]
  tree = metadata.tree if hasattr(metadata, "tree") else metadata
  # Only the wanted subtrees are read (partial_restore); the optimiser state, target
  # and the rest stay on disk.
  keys = tuple(tree) if keys is None else keys
  abstract = {k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree[k]) for k in keys}
  restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=_single_device()), abstract)
  return manager.restore(step, args=ocp.args.Composite(**{
      STATE_ITEM: ocp.args.PyTreeRestore(abstract, restore_args=restore_args, partial_restore=True)}))[STATE_ITEM]
