"""Optimisers from the config: LARS, SGD or AdamW, linear warm-up then cosine decay.

Biases and normalisation parameters (``bias`` and ``scale`` leaves) are excluded from weight decay and from LARS's trust-ratio adaptation, as in SimCLR/BYOL.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from emim.config_base import ConfigError

OPTIMIZERS = ("lars", "sgd", "adamw")


def decay_mask(params):
  """True for weights (kernels, a ViT's embeddings), False for biases and the scales of
  BatchNorm and LayerNorm. By name, not by rank: under ``nn.scan`` a ViT's per-block
  biases and LayerNorm scales are stacked into 2-D arrays (DINO excludes them from decay
  as well; MoCo v3's AdamW decays every parameter, so its recipe differs here)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: getattr(path[-1], "key", None) not in ("bias", "scale"), params)


def learning_rate_schedule(cfg: ml_collections.ConfigDict, batch_size: int, steps_per_epoch: int, total_steps: int):
  """base_lr * batch/256, linear warm-up for warmup_epochs, then cosine to 0."""
  peak = cfg.base_lr * batch_size / 256.0
  warmup = min(int(cfg.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
  if warmup == 0:  # the same cosine, without optax's log line about a warm-up of 0 steps
    return optax.cosine_decay_schedule(init_value=peak, decay_steps=max(total_steps, 1), alpha=0.0)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1), end_value=0.0)


def branch_schedule(schedule, every: int, phase: int):
  """``schedule`` of the global step, for a branch updated only in its phase of an
  alternation (``every`` steps of phase 0, then ``every`` of phase 1, ...): its
  optimiser counts its own updates, and its c-th update is at global step
  (c // every) * 2 every + phase * every + c % every. Both branches thus follow the
  run's warm-up and decay, instead of stretching them twice as long."""

  def at_update(count):
    return schedule((count // every) * 2 * every + phase * every + count % every)

  return at_update


def weight_decay_schedule(start: float, end: float, total_steps: int):
  """DINO's weight-decay schedule: a cosine from ``start`` at step 0 to ``end`` at
  ``total_steps`` (of the optimiser's own update count)."""
  if start == 0:
    return lambda count: end * (1.0 - jnp.cos(jnp.pi * jnp.minimum(count / max(total_steps, 1), 1.0))) / 2.0
  # optax's cosine decays towards alpha * init_value; alpha > 1 rises instead.
  return optax.cosine_decay_schedule(init_value=start, decay_steps=max(total_steps, 1), alpha=end / start)


def make_optimizer(cfg: ml_collections.ConfigDict, schedule, total_steps: int = 0) -> optax.GradientTransformation:
  """The optax chain named by ``cfg.name`` (with gradient clipping when cfg.clip_norm > 0);
  AdamW's weight decay on a cosine to ``cfg.weight_decay_end`` over ``total_steps`` when
  that is set (>= 0)."""
  if cfg.name == "lars":
    tx = optax.lars(schedule, weight_decay=cfg.weight_decay, weight_decay_mask=decay_mask,
                    trust_coefficient=cfg.trust_coefficient, trust_ratio_mask=decay_mask, momentum=cfg.momentum)
  elif cfg.name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(cfg.weight_decay, decay_mask), optax.sgd(schedule, momentum=cfg.momentum))
  elif cfg.name == "adamw":
    wd_end = cfg.get("weight_decay_end", -1.0)
    if wd_end >= 0 and wd_end != cfg.weight_decay:
      # optax.adamw's chain (Adam's scaling, decoupled decay, the learning rate) with the
      # decay on its schedule; optax.adamw itself takes a constant.
      tx = optax.chain(optax.scale_by_adam(),
                       optax.add_decayed_weights(weight_decay_schedule(cfg.weight_decay, wd_end, total_steps), decay_mask),
                       optax.scale_by_learning_rate(schedule))
    else:
      tx = optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=decay_mask)
  else:
    raise ConfigError(f"--config.optim.name={cfg.name!r}: choose one of {', '.join(OPTIMIZERS)}.")
  if cfg.clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
  return tx
