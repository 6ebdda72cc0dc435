"""Models: backbone + projector (the encoder) and the optional predictor."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from emim.config_base import ConfigError
from emim.models import resnet, vit
from emim.models.heads import MLP, MLPBackbone
from emim.models.resnet import ResNet
from emim.models.vit import ViT

# Backbones for images (emim/models/resnet.py, emim/models/vit.py) and "mlp", two hidden
# layers of ``model.width`` for vectors (the Gaussian-mixture experiment).
ARCHITECTURES = (*resnet.ARCHITECTURES, *vit.ARCHITECTURES, "mlp")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class Encoder(nn.Module):
  """backbone -> projector; returns (features, projection), both float32."""

  backbone: ResNet | ViT | MLPBackbone
  projector: MLP

  def __call__(self, images, train: bool = True):
    features = self.backbone(images, train=train)
    return features, self.projector(features, train=train)


def is_vit(name: str) -> bool:
  return name in vit.ARCHITECTURES


def make_backbone(name: str, width: int = 64, cifar_stem: bool = False, dtype: Any = jnp.float32,
                  bn_groups: int = 1, *, patch_size: int = 16, image_size: int = 224, drop_path: float = 0.0,
                  remat_policy: str = "nothing_saveable") -> ResNet | ViT | MLPBackbone:
  """The trunk named ``name``. A ResNet reads ``width`` and ``cifar_stem``; a ViT its size
  from the name, and ``patch_size``, ``image_size`` (the grid its position embeddings are
  stored for), ``drop_path`` and ``remat_policy``; a ViT has no BatchNorm, so
  ``bn_groups`` does not concern it."""
  if name == "mlp":
    return MLPBackbone(width, depth=2, dtype=dtype, bn_groups=bn_groups)
  if is_vit(name):
    return vit.make_backbone(name, patch_size, image_size, drop_path, remat_policy, dtype)
  if name not in resnet.ARCHITECTURES:
    raise ConfigError(f"--config.model.backbone={name!r}: choose one of {', '.join(sorted(ARCHITECTURES))}.")
  return resnet.make_backbone(name, width, cifar_stem, dtype, bn_groups)


def parse_dtype(name: str) -> Any:
  if name not in DTYPES:
    raise ConfigError(f"--config.model.dtype={name!r}: choose one of {', '.join(sorted(DTYPES))}.")
  return DTYPES[name]


def vit_options(model_cfg, image_size: int) -> dict:
  """make_backbone's ViT keywords from a model config (a dict or ConfigDict; configs saved
  before the ViT fields existed get the defaults)."""
  get = model_cfg.get
  return dict(patch_size=get("patch_size", 16), image_size=image_size, drop_path=get("drop_path", 0.0),
              remat_policy=get("remat_policy", "nothing_saveable"))


def make_encoder(model_cfg: ml_collections.ConfigDict, bn_groups: int = 1, image_size: int = 224) -> Encoder:
  """The encoder; ``bn_groups=2`` takes both views interleaved in one call, each
  normalised by its own BatchNorm statistics (the same variables as ``bn_groups=1``).
  ``image_size``: the training resolution (a ViT stores its position embeddings for it)."""
  dtype = parse_dtype(model_cfg.dtype)
  backbone = make_backbone(model_cfg.backbone, model_cfg.width, model_cfg.cifar_stem, dtype, bn_groups,
                           **vit_options(model_cfg, image_size))
  projector = MLP(tuple(model_cfg.projector_dims), output_norm=model_cfg.projector_output_norm, dtype=dtype,
                  bn_groups=bn_groups)
  return Encoder(backbone, projector)


def make_predictor(model_cfg: ml_collections.ConfigDict, bn_groups: int = 1) -> MLP:
  return MLP(tuple(model_cfg.predictor_dims), dtype=parse_dtype(model_cfg.dtype), bn_groups=bn_groups)


def backbone_variables(params: dict, batch_stats: dict) -> dict:
  """The backbone's variables from an encoder's params and batch statistics; a ViT's
  backbone has no BatchNorm, so no statistics (Flax leaves the collection out)."""
  return {"params": params["backbone"], "batch_stats": batch_stats.get("backbone", {})}


__all__ = ["ARCHITECTURES", "Encoder", "MLP", "MLPBackbone", "ResNet", "ViT", "backbone_variables", "is_vit",
           "make_backbone", "make_encoder", "make_predictor", "vit_options"]
