"""ResNet backbones (He et al. 2016) in Flax linen, with a CIFAR or ImageNet stem.

Parameters are float32; ``dtype`` sets the compute dtype (bfloat16 on accelerators).
BatchNorm statistics are over the batch the module sees: under ``jax.jit`` with a batch
sharded over a mesh that is the global batch, as SimCLR's synchronised BN intends.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from emim.config_base import ConfigError

from emim.models.norm import GroupedBatchNorm

ModuleDef = Any

# name -> (block kind, blocks per stage)
ARCHITECTURES = {
    "resnet_tiny": ("basic", (1, 1)),  # tests and the CPU default: two stages, one block each
    "resnet_tiny_bottleneck": ("bottleneck", (1, 1)),  # ResNet-50's block, as small (tests)
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}


class TorchPaddedConv(nn.Conv):
  """A convolution padded k//2 on every side, as torchvision's ResNet pads.

  "SAME" differs for stride 2 on even inputs (it pads only after), which would shift
  every strided window by one pixel against the exported PyTorch model.
  """

  def __post_init__(self):
    ks = self.kernel_size if isinstance(self.kernel_size, (tuple, list)) else (self.kernel_size,) * 2
    object.__setattr__(self, "padding", tuple((k // 2, k // 2) for k in ks))
    super().__post_init__()


class BasicBlock(nn.Module):
  filters: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.filters, (3, 3), name="conv2")(y)
    y = self.norm(name="bn2", scale_init=nn.initializers.zeros)(y)  # zero-init last BN
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, name="downsample_conv")(residual)
      residual = self.norm(name="downsample_bn")(residual)
    return nn.relu(residual + y)


class BottleneckBlock(nn.Module):
  filters: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  expansion: int = 4

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (1, 1), name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.filters, (3, 3), self.strides, name="conv2")(y)  # stride on 3x3 (v1.5)
    y = nn.relu(self.norm(name="bn2")(y))
    y = self.conv(self.filters * self.expansion, (1, 1), name="conv3")(y)
    y = self.norm(name="bn3", scale_init=nn.initializers.zeros)(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters * self.expansion, (1, 1), self.strides, name="downsample_conv")(residual)
      residual = self.norm(name="downsample_bn")(residual)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  """A ResNet trunk returning globally pooled features (no classifier).

  Attributes:
    stage_sizes: blocks per stage.
    block: "basic" or "bottleneck".
    width: filters of the first stage (64 for the standard models).
    cifar_stem: 3x3 stride-1 conv and no max-pool (32x32 inputs) instead of the 7x7
      stride-2 conv and max-pool of the ImageNet stem.
    dtype: compute dtype; parameters stay float32.
    bn_groups: how many interleaved batches (views) one call carries, each normalised
      by its own statistics (GroupedBatchNorm); 1 for one batch.
  """

  stage_sizes: Sequence[int]
  block: str = "basic"
  width: int = 64
  cifar_stem: bool = False
  dtype: Any = jnp.float32
  bn_groups: int = 1

  @property
  def feature_dim(self) -> int:
    expansion = 4 if self.block == "bottleneck" else 1
    return self.width * 2 ** (len(self.stage_sizes) - 1) * expansion

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(TorchPaddedConv, use_bias=False, dtype=self.dtype)
    norm_cls = functools.partial(GroupedBatchNorm, groups=self.bn_groups) if self.bn_groups > 1 else nn.BatchNorm
    norm = functools.partial(norm_cls, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype)
    block_cls = BottleneckBlock if self.block == "bottleneck" else BasicBlock
    x = x.astype(self.dtype)
    if self.cifar_stem:
      x = conv(self.width, (3, 3), name="stem_conv")(x)
      x = nn.relu(norm(name="stem_bn")(x))
    else:
      x = conv(self.width, (7, 7), (2, 2), name="stem_conv")(x)
      x = nn.relu(norm(name="stem_bn")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = block_cls(self.width * 2**i, strides, conv=conv, norm=norm, name=f"stage{i + 1}_block{j + 1}")(x)
    return jnp.mean(x, axis=(1, 2)).astype(jnp.float32)


def make_backbone(name: str, width: int = 64, cifar_stem: bool = False, dtype: Any = jnp.float32,
                  bn_groups: int = 1) -> ResNet:
  if name not in ARCHITECTURES:
    raise ConfigError(f"--config.model.backbone={name!r}: choose one of {', '.join(sorted(ARCHITECTURES))}.")
  block, stages = ARCHITECTURES[name]
  return ResNet(stage_sizes=stages, block=block, width=width, cifar_stem=cifar_stem, dtype=dtype, bn_groups=bn_groups)
