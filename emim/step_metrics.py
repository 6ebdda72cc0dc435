"""A logging interval's metrics from its steps', with ``clu.metrics``.

The progress line and metrics.jsonl report the mean of each step metric over the steps
since the last line (not the last step's value, which one noisy batch can make anything),
the value at the last step for what is a setting or a state (learning rate, momentum,
parameter norm), and the number of updates refused as non-finite. The accumulation runs
on the device inside the compiled step (``train.compile_train_step``), so it costs no
host round trip.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
from clu import metrics as clu_metrics

# The value at the interval's last step: schedules and states, not per-batch noise.
LAST_VALUE = ("lr", "target_momentum", "param_norm")
# Each step's "finite" flag becomes the interval's count of refused updates.
FINITE, REFUSED = "finite", "refused_updates"


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


def _from_step(metrics: dict[str, jax.Array]) -> dict[str, clu_metrics.Metric]:
  out = {}
  for name, value in metrics.items():
    value = jnp.asarray(value, jnp.float32)
    if name == FINITE:
      out[REFUSED] = Sum.from_model_output(1.0 - value)
    elif name in LAST_VALUE:
      out[name] = clu_metrics.LastValue.from_model_output(value)
    else:
      out[name] = clu_metrics.Average.from_model_output(value)
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
  """Host floats: means, last values and the refused count."""
  return {name: float(metric.compute()) for name, metric in jax.device_get(interval).items()}
