"""Models: backbone + projector (the encoder) and the optional predictor."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from emim.models.heads import MLP
from emim.models.resnet import ARCHITECTURES, ResNet, make_backbone

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class Encoder(nn.Module):
  """backbone -> projector; returns (features, projection), both float32."""

  backbone: ResNet
  projector: MLP

  def __call__(self, images, train: bool = True):
    features = self.backbone(images, train=train)
    return features, self.projector(features, train=train)


def parse_dtype(name: str) -> Any:
  if name not in DTYPES:
    raise ValueError(f"Unknown dtype {name!r}; choose one of {sorted(DTYPES)}.")
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


__all__ = ["ARCHITECTURES", "Encoder", "MLP", "ResNet", "make_backbone", "make_encoder", "make_predictor"]
