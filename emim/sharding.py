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
