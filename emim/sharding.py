"""The one place where the mesh and the shardings are made.

A single data-parallel axis over every device of every host. The axis type is Auto:
the compiler propagates shardings through the model and the objectives, so batch
statistics (BatchNorm, covariances) are over the global batch without explicit
collectives.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from emim.config_base import ConfigError

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  """The data axis over ``devices`` (default: every device of every host; a TPU
  topology's devices compile ahead of time for a slice, python -m emim.aot)."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  devices = mesh.devices.size
  if batch_size % devices:
    lower = batch_size - batch_size % devices
    raise ConfigError(
        f"The global batch size {batch_size} is not divisible by the {devices} devices. Set "
        f"--config.train.batch_size to a multiple of {devices} (e.g. {lower or devices} or {lower + devices}).")


def put_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A host array (identical on every process) placed as a global array."""
  return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays sharded over the data axis."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


# ----------------------------------------------------------------------------------
# The train state's sharding (config.sharding): replicated, or split over the data axis.
# ----------------------------------------------------------------------------------
PARAM_RULES = ("replicate", "fsdp", "auto")


def fsdp_spec(shape: tuple[int, ...], nbytes: int, devices: int, min_bytes: float) -> P:
  """Where one array of the state lies under fsdp: split over the data axis along its
  largest dimension that ``devices`` divides when it holds at least ``min_bytes``
  (smaller arrays, and those no dimension of which the device count divides,
  replicated). Ties go to the earlier dimension."""
  if devices == 1 or nbytes < min_bytes:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % devices == 0 and shape[dim] >= devices:
      return P(*([None] * dim + [DATA_AXIS]))
  return P()


def state_bytes(abstract_state) -> int:
  """Bytes of every array of a (possibly abstract) state."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract_state))


def resolve_params_rule(rule: str, abstract_state, mesh: Mesh, auto_fsdp_gib: float = 2.0) -> str:
  """"replicate" or "fsdp": ``rule`` itself, or, for "auto", fsdp when a replicated copy of
  the state would take more than ``auto_fsdp_gib`` GiB of each device (on one device,
  replicate: there is nothing to split over)."""
  if rule not in PARAM_RULES:
    raise ConfigError(f"--config.sharding.params={rule!r}: choose one of {', '.join(PARAM_RULES)}.")
  if rule != "auto":
    return rule
  large = state_bytes(abstract_state) > auto_fsdp_gib * 2**30
  return "fsdp" if large and mesh.devices.size > 1 else "replicate"


def state_sharding(abstract_state, mesh: Mesh, rule: str = "replicate", fsdp_min_mib: float = 4.0,
                   auto_fsdp_gib: float = 2.0):
  """The sharding of every array of the train state under ``rule`` (config.sharding.params):
  one rule for every field alike (params, optimiser moments, the EMA target, a trained
  target's optimiser state), so that an array and its moments lie the same way and the
  update needs no communication. Under fsdp the step gathers the params whole where it
  uses them (``train_step._whole``: one all-gather, its gradient a reduce-scatter), so the
  forward and backward stay data-parallel."""
  if resolve_params_rule(rule, abstract_state, mesh, auto_fsdp_gib) == "replicate":
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)
  devices, min_bytes = mesh.devices.size, fsdp_min_mib * 2**20
  return jax.tree.map(
      lambda x: NamedSharding(mesh, fsdp_spec(x.shape, int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize, devices,
                                              min_bytes)), abstract_state)
