"""MI estimators tracked during training (spec section 2), cosine critic T = cos / tau.

In a batch of n pairs, the joint p is the matched pairs (i, i) and the product of
marginals p(za) p(zb) the unmatched pairs (i, j != i). All in float32 over the global
batch; with no gradient wanted, call them under ``jax.lax.stop_gradient`` or on a fixed
evaluation batch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from emim.objectives.gaussian import gaussian_mi, standardize

Array = jax.Array


def l2_normalize(z: Array, axis: int = -1, eps: float = 1e-12) -> Array:
  """z / ||z|| in float32 (eps keeps a zero vector finite)."""
  z = z.astype(jnp.float32)
  return z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=axis, keepdims=True), eps * eps))


def cosine_critic(za: Array, zb: Array, tau: float = 1.0) -> Array:
  """T_ij = cos(za_i, zb_j) / tau, an (n, n) matrix."""
  return l2_normalize(za) @ l2_normalize(zb).T / tau


def _off_diagonal_mask(n: int) -> Array:
  return ~jnp.eye(n, dtype=bool)


def dv(za: Array, zb: Array, tau: float = 1.0) -> Array:
  """Donsker-Varadhan ("cos-DV"): mean_i T_ii - log mean_{i != j} exp T_ij."""
  t = cosine_critic(za, zb, tau)
  n = t.shape[0]
  off = jnp.where(_off_diagonal_mask(n), t, -jnp.inf)
  return jnp.mean(jnp.diagonal(t)) - (jax.nn.logsumexp(off) - math.log(n * (n - 1)))


def infonce(za: Array, zb: Array, tau: float = 1.0) -> Array:
  """InfoNCE: mean_i [T_ii - log mean_j exp T_ij]; at most log n."""
  t = cosine_critic(za, zb, tau)
  n = t.shape[0]
  return jnp.mean(jnp.diagonal(t) - jax.nn.logsumexp(t, axis=1)) + math.log(n)


def jsd(za: Array, zb: Array, tau: float = 1.0) -> Array:
  """Jensen-Shannon: mean_i [-softplus(-T_ii)] - mean_{i != j} softplus(T_ij)."""
  t = cosine_critic(za, zb, tau)
  n = t.shape[0]
  positive = jnp.mean(-jax.nn.softplus(-jnp.diagonal(t)))
  negative = jnp.sum(jnp.where(_off_diagonal_mask(n), jax.nn.softplus(t), 0.0)) / (n * (n - 1))
  return positive - negative


def mi_estimates(za: Array, zb: Array, tau: float = 1.0, eps: float = 1e-3) -> dict[str, Array]:
  """All four estimates on one batch: DV, InfoNCE, JSD (cosine critic) and Gaussian.

  The Gaussian MI is invariant to per-dimension scaling, so it is taken of the
  standardised embeddings with a ridge ``eps`` that means the same for every run and
  keeps rank-deficient batches (n < 2d) finite.
  """
  za = jax.lax.stop_gradient(za)
  zb = jax.lax.stop_gradient(zb)
  return {
      "mi_dv": dv(za, zb, tau),
      "mi_infonce": infonce(za, zb, tau),
      "mi_jsd": jsd(za, zb, tau),
      "mi_gaussian": gaussian_mi(standardize(za), standardize(zb), form="joint", eps=eps),
  }
