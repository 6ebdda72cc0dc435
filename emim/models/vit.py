"""Vision Transformer backbones (Dosovitskiy et al. 2021) in Flax linen.

ViT-Ti/S/B/L at the published widths, depths and heads (Touvron et al. 2021 for Ti and S),
pre-LayerNorm blocks, a class token whose final LayerNormed state is the feature (what
the kNN, the linear probe and the projector read, as DINO and MoCo v3 do), learned
position embeddings resampled bilinearly to the input's patch grid (the same parameters
run at another resolution), and stochastic depth rising linearly from 0 in the first
block to ``drop_path`` in the last.

The blocks run under ``nn.scan`` (one block's program, its parameters stacked along a
leading axis of length depth), wrapped in ``nn.remat`` with the config's checkpoint
policy, so that compile time and saved activations do not grow with depth (big_vision's
``models/vit.py`` does the same). Attention is ``jax.nn.dot_product_attention``: a GPU
gets cuDNN's fused kernel where it applies. Parameters are float32; ``dtype`` is the
compute dtype (bfloat16 on accelerators); the features are returned in float32.

Drop path draws from the ``dropout`` RNG stream: it is active in train mode when the
caller gives that stream (the online branch of the train step does), and off otherwise
(the EMA target's forward, as DINO's teacher has no stochastic depth; evaluation).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from emim.config_base import ConfigError


@dataclasses.dataclass(frozen=True)
class ViTSize:
  width: int
  depth: int
  heads: int
  mlp_ratio: int = 4


# name -> size; the patch size comes from config.model.patch_size (16 for these names at
# 224x224; 4 for 32x32 CIFAR images, configs/cifar10.py:vit_s).
ARCHITECTURES = {
    "vit_tiny": ViTSize(32, 2, 2),  # tests and the CPU runlocal variant: seconds to compile
    "vit_ti16": ViTSize(192, 12, 3),  # DeiT-Ti (Touvron et al. 2021)
    "vit_s16": ViTSize(384, 12, 6),  # DeiT-S / ViT-S
    "vit_b16": ViTSize(768, 12, 12),  # ViT-B (Dosovitskiy et al. 2021)
    "vit_l16": ViTSize(1024, 24, 16),  # ViT-L
}

# config.model.remat_policy -> what each block keeps for the backward pass.
REMAT_POLICIES = {
    "none": None,  # no rematerialisation: every activation kept (fastest, most memory)
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

_kernel_init = nn.initializers.xavier_uniform()


def resample_position_embedding(posemb: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """(1, h, w, D) position embeddings -> (1, grid[0], grid[1], D), bilinear."""
  if posemb.shape[1:3] == tuple(grid):
    return posemb
  return jax.image.resize(posemb, (1, *grid, posemb.shape[-1]), method="bilinear")


class Attention(nn.Module):
  """Multi-head self-attention: one qkv projection, ``jax.nn.dot_product_attention``, an
  output projection (timm's ``qkv`` and ``proj`` layers)."""

  heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    head_dim = width // self.heads
    qkv = nn.DenseGeneral((3, self.heads, head_dim), dtype=self.dtype, kernel_init=_kernel_init, name="qkv")(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each (B, T, heads, head_dim)
    y = jax.nn.dot_product_attention(q, k, v)  # scaled by 1/sqrt(head_dim)
    return nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype, kernel_init=_kernel_init, name="proj")(y)


class Block(nn.Module):
  """A pre-LayerNorm encoder block: x + drop_path(attn(LN(x))), then x + drop_path(mlp(LN(x))).

  ``__call__(x, drop_rate) -> (x, None)``, the signature ``nn.scan`` steps through, with
  this block's drop-path rate as its scanned input."""

  heads: int
  mlp_dim: int
  dtype: Any = jnp.float32
  deterministic: bool = True

  def drop_path(self, y, rate):
    """Stochastic depth: each example's residual branch kept with probability 1 - rate and
    scaled by 1 / (1 - rate)."""
    if self.deterministic:
      return y
    keep = 1.0 - rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (y.shape[0],) + (1,) * (y.ndim - 1))
    return jnp.where(mask, y / keep.astype(y.dtype), jnp.zeros_like(y))

  @nn.compact
  def __call__(self, x, drop_rate):
    norm = lambda name: nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=name)
    y = Attention(self.heads, self.dtype, name="attn")(norm("norm1")(x))
    x = x + self.drop_path(y, drop_rate)
    y = norm("norm2")(x)
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=_kernel_init, name="fc1")(y)
    y = nn.gelu(y, approximate=False)
    y = nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=_kernel_init, name="fc2")(y)
    return x + self.drop_path(y, drop_rate), None


class ViT(nn.Module):
  """A ViT trunk returning the final class token's state (LayerNormed), float32.

  Attributes:
    width, depth, heads, mlp_ratio: the size (ARCHITECTURES).
    patch_size: pixels per patch side.
    image_size: the training resolution; the position embeddings are stored for its patch
      grid and resampled to any other.
    drop_path: stochastic depth of the last block (linearly less before it).
    remat_policy: a key of REMAT_POLICIES.
    dtype: compute dtype; parameters stay float32.
  """

  width: int
  depth: int
  heads: int
  mlp_ratio: int = 4
  patch_size: int = 16
  image_size: int = 224
  drop_path: float = 0.0
  remat_policy: str = "nothing_saveable"
  dtype: Any = jnp.float32

  @property
  def feature_dim(self) -> int:
    return self.width

  @nn.compact
  def __call__(self, images, train: bool = True):
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="patch_embed")(
        images.astype(self.dtype))
    n, gh, gw, _ = x.shape
    stored_grid = self.image_size // p
    posemb = self.param("pos_embedding", nn.initializers.normal(0.02), (1, stored_grid, stored_grid, self.width))
    x = x + resample_position_embedding(posemb, (gh, gw)).astype(self.dtype)
    x = x.reshape(n, gh * gw, self.width)
    cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (n, 1, self.width)), x], axis=1)

    deterministic = not train or self.drop_path == 0.0 or not self.has_rng("dropout")
    block = Block
    policy = REMAT_POLICIES[self.remat_policy]
    if self.remat_policy != "none":
      block = nn.remat(Block, policy=policy, prevent_cse=False)  # prevent_cse unneeded under scan
    blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                     in_axes=0, length=self.depth)
    rates = jnp.linspace(0.0, self.drop_path, self.depth, dtype=jnp.float32)
    x, _ = blocks(self.heads, self.mlp_ratio * self.width, self.dtype, deterministic, name="blocks")(x, rates)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
    return x[:, 0].astype(jnp.float32)


def make_backbone(name: str, patch_size: int = 16, image_size: int = 224, drop_path: float = 0.0,
                  remat_policy: str = "nothing_saveable", dtype: Any = jnp.float32) -> ViT:
  if name not in ARCHITECTURES:
    raise ConfigError(f"--config.model.backbone={name!r}: choose one of {', '.join(sorted(ARCHITECTURES))}.")
  if remat_policy not in REMAT_POLICIES:
    raise ConfigError(f"--config.model.remat_policy={remat_policy!r}: choose one of "
                      f"{', '.join(sorted(REMAT_POLICIES))}.")
  s = ARCHITECTURES[name]
  return ViT(s.width, s.depth, s.heads, s.mlp_ratio, patch_size, image_size, drop_path, remat_policy, dtype)
