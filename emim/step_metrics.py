"""A logging interval's metrics from its steps', with ``clu.metrics``.

The progress line and metrics.jsonl report the mean of each step metric over the steps
since the last line whose update was finite (not the last step's value, which one noisy
batch can make anything; a refused step's NaN would make the mean NaN), the value at the
last step for what is a setting or a state (learning rate, momentum, parameter norm), the
number of updates refused as non-finite, and the longest run of them. The accumulation runs
on the device inside the compiled step (``train.compile_train_step``), so it costs no
host round trip.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

# The value at the interval's last step: schedules and states, not per-batch noise.
LAST_VALUE = ("lr", "target_momentum", "param_norm")
# Each step's "finite" flag becomes the interval's count of refused updates, and the
# state's count of refusals in a row the interval's longest.
FINITE, REFUSED = "finite", "refused_updates"
IN_A_ROW, LONGEST = "refused_in_a_row", "refused_in_a_row_max"


@flax.struct.dataclass
class Sum(clu_metrics.Metric):
  """The sum over the interval (clu has means, not sums)."""

  total: jax.Array

  @classmethod
  def from_model_output(cls, values: jax.Array, **_) -> "Sum":
    return cls(total=jnp.sum(values).astype(jnp.float32))

  def merge(self, other: "Sum") -> "Sum":
    return type(self)(total=self.total + other.total)

  def compute(self) -> jax.Array:
    return self.total


@flax.struct.dataclass
class Max(clu_metrics.Metric):
  """The largest value over the interval."""

  value: jax.Array

  @classmethod
  def from_model_output(cls, values: jax.Array, **_) -> "Max":
    return cls(value=jnp.max(values).astype(jnp.float32))

  def merge(self, other: "Max") -> "Max":
    return type(self)(value=jnp.maximum(self.value, other.value))

  def compute(self) -> jax.Array:
    return self.value


def _from_step(metrics: dict[str, jax.Array]) -> dict[str, clu_metrics.Metric]:
  finite = jnp.asarray(metrics.get(FINITE, 1.0), jnp.float32) > 0.5
  out = {}
  for name, value in metrics.items():
    value = jnp.asarray(value, jnp.float32)
    if name == FINITE:
      out[REFUSED] = Sum.from_model_output(1.0 - value)
    elif name == IN_A_ROW:
      out[LONGEST] = Max.from_model_output(value)
    elif name in LAST_VALUE:
      out[name] = clu_metrics.LastValue.from_model_output(value)
    else:  # a refused step's values (NaN, inf) are left out of the mean
      out[name] = clu_metrics.Average.from_model_output(value[None], mask=finite[None])
  return out


def empty(metric_shapes: dict[str, jax.ShapeDtypeStruct]) -> dict[str, clu_metrics.Metric]:
  """An interval with no steps yet, for metrics shaped like ``metric_shapes``."""
  zero = _from_step({k: jnp.zeros(v.shape, jnp.float32) for k, v in metric_shapes.items()})
  return jax.tree.map(jnp.zeros_like, zero)


def merge(interval: dict[str, clu_metrics.Metric], step_metrics: dict[str, jax.Array]) -> dict[str, clu_metrics.Metric]:
  """``interval`` with one more step's metrics (traceable: runs inside the step)."""
  step = _from_step(step_metrics)
  # LastValue's merge keeps the newer value; an empty Average or Sum merges as zero.
  return {name: metric.merge(step[name]) for name, metric in interval.items()}


def compute(interval: dict[str, clu_metrics.Metric]) -> dict[str, float]:
  """Host floats: means, last values and the refused count (a mean over no finite step
  is NaN: there was nothing to average)."""
  with np.errstate(invalid="ignore", divide="ignore"):
    return {name: float(metric.compute()) for name, metric in jax.device_get(interval).items()}
