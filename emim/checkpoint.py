"""Every Orbax call of emim lives here.

Resume order: the run's own work directory (latest checkpoint, or ``restore_step``),
else a fresh state. Checkpoints are saved asynchronously every ``every_steps`` steps and
at the end, the newest ``keep`` kept. A checkpoint that cannot be read is reported with
its path and left in place: nothing already saved is deleted.
"""

from __future__ import annotations

import logging
import pathlib

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored; the message names the path and the fix."""


class Checkpointer:
  """A thin wrapper over ``ocp.CheckpointManager`` holding the train state pytree."""

  def __init__(self, directory: str | pathlib.Path, every_steps: int = 1000, keep: int = 3, async_save: bool = True):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=max(1, every_steps), enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def restore(self, abstract_state, step: int | None = None):
    """The state at ``step`` (default latest) with the shardings of ``abstract_state``,
    or None when there is no checkpoint."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    if step not in self.all_steps():
      raise CheckpointError(f"No checkpoint at step {step} in {self.directory}; available: {self.all_steps()}.")
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:
      raise CheckpointError(
          f"Cannot restore the checkpoint at {self.directory / str(step)} ({type(e).__name__}: {e}). It is "
          "left as it is. Restore an earlier step with --config.checkpoint.restore_step=N, or start in a new "
          "--workdir; a config that changed the model or method since it was written also fails here.") from e

  def save(self, step: int, state, force: bool = False) -> bool:
    """Save when the interval says so (or ``force``); returns whether it saved."""
    return self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs with shardings: what ``restore`` fills in."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _single_device():
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def restore_subtree(directory: str | pathlib.Path, step: int | None, keys: tuple[str, ...]):
  """Only ``keys`` of a saved state (e.g. params and batch_stats for evaluation), on the
  default device, from the latest or a given step, without building the full state."""
  directory = pathlib.Path(directory).absolute()
  if not directory.is_dir():
    raise CheckpointError(f"No checkpoints in {directory}: train first, or point --workdir at a training run.")
  manager = ocp.CheckpointManager(
      directory, item_handlers=ocp.PyTreeCheckpointHandler(), options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step() if step is None else step
  if step is None or step not in manager.all_steps():
    available = list(manager.all_steps())
    manager.close()
    if not available:
      raise CheckpointError(f"No checkpoint in {directory}: train first, or point --workdir at a training run.")
    raise CheckpointError(f"No checkpoint at step {step} in {directory}; available steps: {available}.")
  try:
    metadata = manager.item_metadata(step)
    tree = metadata.tree if hasattr(metadata, "tree") else metadata
    # Only the wanted subtrees are read (partial_restore); the optimiser state, target
    # and the rest stay on disk.
    abstract = {k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree[k]) for k in keys}
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=_single_device()), abstract)
    restored = manager.restore(step, args=ocp.args.PyTreeRestore(abstract, restore_args=restore_args, partial_restore=True))
  except Exception as e:
    raise CheckpointError(f"Cannot read {keys} from the checkpoint at {directory / str(step)} ({type(e).__name__}: {e}).") from e
  finally:
    manager.close()
  logging.info("Restored %s from %s at step %d.", keys, directory, step)
  return step, restored
