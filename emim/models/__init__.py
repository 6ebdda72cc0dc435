"""Models: backbone + projector (the encoder) and the optional predictor."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from emim.config_base import ConfigError
from emim.models import resnet
from emim.models.heads import MLP, MLPBackbone
from emim.models.resnet import ResNet

# Backbones for images (emim/models/resnet.py) and "mlp", two hidden layers of
# ``model.width`` for vectors (the Gaussian-mixture experiment).
ARCHITECTURES = (*resnet.ARCHITECTURES, "mlp")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class Encoder(nn.Module):
  """backbone -> projector; returns (features, projection), both float32."""

  backbone: ResNet | MLPBackbone
  projector: MLP

  def __call__(self, images, train: bool = True):
    features = self.backbone(images, train=train)
    return features, self.projector(features, train=train)


def make_backbone(name: str, width: int = 64, cifar_stem: bool = False, dtype: Any = jnp.float32,
                  bn_groups: int = 1) -> ResNet | MLPBackbone:
  if name == "mlp":
    return MLPBackbone(width, depth=2, dtype=dtype, bn_groups=bn_groups)
  if name not in resnet.ARCHITECTURES:
    raise ConfigError(f"--config.model.backbone={name!r}: choose one of {', '.join(sorted(ARCHITECTURES))}.")
  return resnet.make_backbone(name, width, cifar_stem, dtype, bn_groups)


def parse_dtype(name: str) -> Any:
  if name not in DTYPES:
    raise ConfigError(f"--config.model.dtype={name!r}: choose one of {', '.join(sorted(DTYPES))}.")
  return DTYPES[name]


def make_encoder(model_cfg: ml_collections.ConfigDict, bn_groups: int = 1) -> Encoder:
  """The encoder; ``bn_groups=2`` takes both views interleaved in one call, each
  normalised by its own BatchNorm statistics (the same variables as ``bn_groups=1``)."""
  dtype = parse_dtype(model_cfg.dtype)
  backbone = make_backbone(model_cfg.backbone, model_cfg.width, model_cfg.cifar_stem, dtype, bn_groups)
  projector = MLP(tuple(model_cfg.projector_dims), output_norm=model_cfg.projector_output_norm, dtype=dtype,
                  bn_groups=bn_groups)
  return Encoder(backbone, projector)


def make_predictor(model_cfg: ml_collections.ConfigDict, bn_groups: int = 1) -> MLP:
  return MLP(tuple(model_cfg.predictor_dims), dtype=parse_dtype(model_cfg.dtype), bn_groups=bn_groups)


__all__ = ["ARCHITECTURES", "Encoder", "MLP", "MLPBackbone", "ResNet", "make_backbone", "make_encoder", "make_predictor"]
