"""Every Orbax call of emim lives here.

A checkpoint step holds two items:
  ``state``  the train state pytree (params, batch statistics, optimiser, EMA target, ...);
  ``data``   the Grain iterator's state, one JSON file per process, when the run streams
             its data (in-memory data has no iterator: its order is a function of the step).

Resume order: the run's own work directory (latest checkpoint, or ``restore_step``), else
another run's checkpoints named by ``init_from`` (a fork), else a fresh state.
Checkpoints are saved asynchronously every ``every_steps`` steps and at the end, the
newest ``keep`` kept. A checkpoint that cannot be read is reported with its path and left
in place: nothing already saved is deleted.
"""

from __future__ import annotations

import logging
import pathlib

import grain  # its iterator handler registers with Orbax on import
import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging

STATE_ITEM = "state"
DATA_ITEM = "data"


class _OrbaxInfoFilter(logging.Filter):
  """Drops the INFO chatter of Orbax's every save and restore (warnings pass)."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def quiet_orbax_logs() -> None:
  """Keep the programs' logs readable: progress lines, not Orbax's I/O statistics."""
  absl_logging.get_absl_handler().addFilter(_OrbaxInfoFilter())


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored; the message names the path and the fix."""


class Checkpointer:
  """A thin wrapper over ``ocp.CheckpointManager`` for the train state and, when the
  data streams, the data iterator."""

  def __init__(self, directory: str | pathlib.Path, every_steps: int = 1000, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = pathlib.Path(directory).absolute()
    if read_only and not self.directory.is_dir():
      raise CheckpointError(f"No checkpoints in {self.directory}: is this a training run's work directory?")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=max(1, every_steps), enable_async_checkpointing=async_save,
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
      raise CheckpointError(
          f"Cannot restore the checkpoint at {self.directory / str(step)} ({type(e).__name__}: {e}). It is "
          "left as it is. Restore an earlier step with --config.checkpoint.restore_step=N, or start in a new "
          "--workdir; a config that changed the model or method since it was written also fails here.") from e
    return restored[STATE_ITEM], with_data

  def reached_preemption(self, step: int) -> bool:
    """Whether JAX's preemption service (multi-process jobs) asks every process to save
    and stop at ``step``; False when the service is not running."""
    return self._manager.reached_preemption(step)

  def save(self, step: int, state, data_iterator=None, force: bool = False) -> bool:
    """Save when the interval says so (or ``force``); returns whether it saved. The data
    iterator's position is read now, synchronously, so it matches ``state``."""
    items = {STATE_ITEM: ocp.args.StandardSave(state)}
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


def restore_subtree(directory: str | pathlib.Path, step: int | None, keys: tuple[str, ...] | None):
  """Only ``keys`` of a saved state (e.g. params and batch_stats for evaluation; None:
  every saved field), on the default device, from the latest or a given step, without
  building the full state."""
  directory = pathlib.Path(directory).absolute()
  if not directory.is_dir():
    raise CheckpointError(f"No checkpoints in {directory}: train first, or point --workdir at a training run.")
  manager = ocp.CheckpointManager(
      directory, item_handlers={STATE_ITEM: ocp.PyTreeCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step() if step is None else step
  if step is None or step not in manager.all_steps():
    available = sorted(manager.all_steps())
    manager.close()
    if not available:
      raise CheckpointError(f"No checkpoint in {directory}: train first, or point --workdir at a training run.")
    raise CheckpointError(f"No checkpoint at step {step} in {directory}; available steps: {available}.")
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
    raise CheckpointError(f"Cannot read {keys} from the checkpoint at {directory / str(step)} ({type(e).__name__}: {e}).") from e
  finally:
    manager.close()
  logging.info("Restored %s from %s at step %d.", keys, directory, step)
  return step, restored
