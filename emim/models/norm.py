"""BatchNorm over interleaved groups: both views of a batch through one forward, each
normalised by its own statistics, as two forwards would.

A two-view step runs the encoder on view 1, then on view 2 (and the target twice more),
each forward's BatchNorm using its own view's batch statistics. One forward of both views
is cheaper on an accelerator (one launch per layer, larger matrices), but a plain
BatchNorm over the 2n rows would mix the views' statistics and change the model.
``GroupedBatchNorm`` takes the batch as ``groups`` interleaved parts (row ``i * groups +
g`` belongs to part ``g``: stacking the views on axis 1 keeps every device's rows its
own), normalises each part by its own mean and variance, and updates the running
averages with each part in turn, so that it computes what ``groups`` calls of Flax's
``nn.BatchNorm`` compute, with the same variables (params ``scale``, ``bias``;
batch_stats ``mean``, ``var``), in the same precision (float32 statistics,
``E[x^2] - E[x]^2``, as Flax's fast variance).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax


class GroupedBatchNorm(nn.Module):
  """``nn.BatchNorm`` (features on the last axis) applied to ``groups`` interleaved
  parts of the batch separately; ``groups=1`` is ``nn.BatchNorm``."""

  use_running_average: bool | None = None
  groups: int = 1
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Any = nn.initializers.zeros
  scale_init: Any = nn.initializers.ones

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None):
    use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
    features = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (features,))
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (features,))
    if x.shape[0] % self.groups:
      raise ValueError(f"GroupedBatchNorm: a batch of {x.shape[0]} rows is not {self.groups} equal groups.")
    # (rows, ...) -> (rows / groups, groups, ...): part g is every groups-th row from g.
    grouped = x.reshape((x.shape[0] // self.groups, self.groups) + x.shape[1:])
    reduce_axes = (0,) + tuple(range(2, grouped.ndim - 1))
    if use_running_average:
      mean, var = ra_mean.value[None], ra_var.value[None]  # (1, features): every group alike
    else:
      stats_dtype = jnp.promote_types(self.dtype or x.dtype, jnp.float32)
      xf = grouped.astype(stats_dtype)
      mean = xf.mean(reduce_axes)  # (groups, features)
      var = jnp.maximum(0.0, (xf * xf).mean(reduce_axes) - mean * mean)
      if not self.is_initializing():
        m, v = ra_mean.value, ra_var.value
        for g in range(self.groups):  # each part in turn, as consecutive forwards would
          m = self.momentum * m + (1 - self.momentum) * mean[g]
          v = self.momentum * v + (1 - self.momentum) * var[g]
        ra_mean.value, ra_var.value = m, v
    # Broadcast (groups or 1, features) over (rows / groups, groups, ..., features).
    shape = (1, mean.shape[0]) + (1,) * (grouped.ndim - 3) + (features,)
    y = grouped - mean.reshape(shape)
    mul = lax.rsqrt(var + self.epsilon).reshape(shape)
    args = [x]
    if self.use_scale:
      scale = self.param("scale", self.scale_init, (features,), self.param_dtype)
      mul = mul * scale
      args.append(scale)
    y = y * mul
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (features,), self.param_dtype)
      y = y + bias
      args.append(bias)
    out_dtype = self.dtype or jnp.result_type(*args)
    return jnp.asarray(y, out_dtype).reshape(x.shape)
