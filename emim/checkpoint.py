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

import grain  # its iterator handler registers with Orbax on import
import jax
import orbax.checkpoint as ocp

from emim import fs
from emim.errors import UserError

STATE_ITEM = "state"
CONFIG_ITEM = "config"
DATA_ITEM = "data"


# Orbax's warnings about options emim sets on purpose: a read-only manager (evaluation,
# export, a fork's source) "setting save_interval_steps=0", "setting create=False".
_CHOSEN_OPTION_WARNINGS = ("read_only=True, setting", "Given directory is read only")


class _OrbaxInfoFilter(logging.Filter):
  """Drops the INFO chatter of Orbax's every save and restore, and its warnings about
  the options emim chose (other warnings pass)."""

  def filter(self, record):
    if "orbax" not in record.pathname:
      return True
    return record.levelno >= logging.WARNING and not any(w in record.getMessage() for w in _CHOSEN_OPTION_WARNINGS)


def quiet_orbax_logs() -> None:
  """Keep the programs' logs readable: progress lines, not Orbax's I/O statistics. On
  the "absl" logger itself, so that every handler (absl's, or the root logger's that
  prints "WARNING:absl:") sees the filtered records; once, however often called."""
  logger = logging.getLogger("absl")
  if not any(isinstance(f, _OrbaxInfoFilter) for f in logger.filters):
    logger.addFilter(_OrbaxInfoFilter())


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
    self._manager = ocp.CheckpointManager(self.directory, options=options)

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
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def close(self):
    self._manager.wait_until_finished()
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


def _single_device():
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _read_only_manager(directory: fs.Path, step: int | None):
  """(manager, step): a read-only manager over ``directory`` and the step it holds (the
  latest when ``step`` is None); a clear error when there is none."""
  if not directory.is_dir():
    raise CheckpointError(f"No checkpoints in {directory}: train first, or point --workdir at a training run.")
  manager = ocp.CheckpointManager(
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
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    return manager.latest_step()
  finally:
    manager.close()


def restore_config(directory: fs.PathLike, step: int | None) -> tuple[int, dict | None]:
  """(step, the config saved with that checkpoint), the latest step by default; the
  config is None for a checkpoint written before checkpoints held their config."""
  manager, step = _read_only_manager(fs.as_path(directory), step)
  try:
    if not (manager.directory / str(step) / CONFIG_ITEM).is_dir():
      return step, None
    restored = manager.restore(step, args=ocp.args.Composite(**{CONFIG_ITEM: ocp.args.JsonRestore()}))
    return step, json.loads(json.dumps(restored[CONFIG_ITEM]))
  except Exception as e:
    raise CheckpointError(f"Cannot read the config saved in {directory}/{step} ({type(e).__name__}: {e}).") from e
  finally:
    manager.close()


def restore_subtree(directory: fs.PathLike, step: int | None, keys: tuple[str, ...] | None):
  """Only ``keys`` of a saved state (e.g. params and batch_stats for evaluation; None:
  every saved field), on the default device, from the latest or a given step, without
  building the full state."""
  directory = fs.as_path(directory)
  manager, step = _read_only_manager(directory, step)
  try:
    metadata = manager.item_metadata(step)[STATE_ITEM]
    tree = metadata.tree if hasattr(metadata, "tree") else metadata
    # Only the wanted subtrees are read (partial_restore); the optimiser state, target
    # and the rest stay on disk.
    keys = tuple(tree) if keys is None else keys
    abstract = {k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree[k]) for k in keys}
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=_single_device()), abstract)
    restored = manager.restore(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.PyTreeRestore(abstract, restore_args=restore_args, partial_restore=True)}))[STATE_ITEM]
  except Exception as e:
    others = [s for s in manager.all_steps() if s != step]
    choose = (f" Evaluate another with --checkpoint_step (this run has {others[-5:]})." if others else
              " It is the run's only checkpoint.")
    text = " ".join(str(e).split())
    detail = text if len(text) <= 300 else text[:300] + " ..."
    raise CheckpointError(f"Cannot read {keys} from the checkpoint at {directory / str(step)}: it is truncated or "
                          f"corrupt.{choose} The error: {type(e).__name__}: {detail}") from e
  finally:
    manager.close()
  logging.info("Restored %s from %s at step %d.", keys, directory, step)
  return step, restored
