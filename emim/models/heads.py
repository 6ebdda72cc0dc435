"""Projector and predictor MLPs: Dense -> BatchNorm -> ReLU per hidden layer."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from emim.models.norm import GroupedBatchNorm


class MLP(nn.Module):
  """An MLP head as in SimCLR/BYOL/Barlow Twins.

  Attributes:
    dims: widths of every layer; the last is the output.
    batch_norm: BatchNorm after each hidden Dense (before the ReLU).
    output_norm: an affine-free BatchNorm on the output (Barlow Twins/VICReg style).
    dtype: compute dtype; the output is returned in float32 for the objectives.
    bn_groups: how many interleaved batches (views) one call carries, each normalised
      by its own statistics (GroupedBatchNorm); 1 for one batch.
  """

  dims: Sequence[int]
  batch_norm: bool = True
  output_norm: bool = False
  dtype: Any = jnp.float32
  bn_groups: int = 1

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm_cls = functools.partial(GroupedBatchNorm, groups=self.bn_groups) if self.bn_groups > 1 else nn.BatchNorm
    norm = lambda **kw: norm_cls(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, **kw)
    for i, d in enumerate(self.dims[:-1]):
      x = nn.Dense(d, use_bias=not self.batch_norm, dtype=self.dtype, name=f"dense{i}")(x)
      if self.batch_norm:
        x = norm(name=f"bn{i}")(x)
      x = nn.relu(x)
    x = nn.Dense(self.dims[-1], dtype=self.dtype, name=f"dense{len(self.dims) - 1}")(x)
    if self.output_norm:
      x = norm(use_scale=False, use_bias=False, name="output_bn")(x)
    return x.astype(jnp.float32)


class MLPBackbone(nn.Module):
  """The trunk for vectors (the Gaussian-mixture experiment): ``depth`` hidden layers of
  ``width``, Dense -> BatchNorm -> ReLU each; the last one's output are the features."""

  width: int
  depth: int = 2
  dtype: Any = jnp.float32
  bn_groups: int = 1

  @property
  def feature_dim(self) -> int:
    return self.width

  @nn.compact
  def __call__(self, x, train: bool = True):
    norm_cls = functools.partial(GroupedBatchNorm, groups=self.bn_groups) if self.bn_groups > 1 else nn.BatchNorm
    x = x.astype(self.dtype)
    for i in range(self.depth):
      x = nn.Dense(self.width, use_bias=False, dtype=self.dtype, name=f"dense{i}")(x)
      x = norm_cls(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name=f"bn{i}")(x)
      x = nn.relu(x)
    return x.astype(jnp.float32)
