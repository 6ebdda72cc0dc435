"""The momentum (EMA) target: xi <- m xi + (1 - m) theta, m on a cosine schedule to 1."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def momentum_schedule(base_momentum: float, total_steps: int):
  """BYOL's m(t) = 1 - (1 - m0) (cos(pi t / T) + 1) / 2: m0 at the start, 1 at the end."""

  def schedule(step):
    progress = jnp.minimum(step / max(total_steps, 1), 1.0)
    return 1.0 - (1.0 - base_momentum) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0

  return schedule


def ema_update(target, online, momentum):
  """The target pytree moved towards the online one; no gradient flows through it."""
  return jax.tree.map(lambda t, o: momentum * t + (1.0 - momentum) * jax.lax.stop_gradient(o), target, online)
