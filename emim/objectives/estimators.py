"""MI estimators tracked during training (docs/objective.md), cosine critic T = cos / tau.

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
from emim.objectives.precision import float32_products

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


@float32_products
def _leading_directions(sa: Array, sb: Array, k: int) -> Array:
  """(d, k) leading eigenvectors of the pooled covariance of two standardised views."""
  pooled = jnp.concatenate([sa, sb], axis=0)
  _, vectors = jnp.linalg.eigh(pooled.T @ pooled / pooled.shape[0])  # ascending eigenvalues
  return vectors[:, ::-1][:, :k]


def default_principal_dims(n: int, d: int) -> int:
  """min(d, n // 32): each half of the batch holds 16 samples per kept direction."""
  return min(d, max(1, n // 32))


def principal_gaussian_mi(za: Array, zb: Array, dims: int | None = None, eps: float = 1e-5) -> Array:
  """The debiased Gaussian MI of two views in their ``dims`` leading principal directions.

  A Gaussian MI of d-dimensional embeddings from a batch of n is only readable when n is
  many times d: the plug-in estimate over-states it by d^2 / (2n) nats or more (21.8 for
  d = 128, n = 512), and on real networks, whose spectra have long low-variance tails,
  even the debiased estimate drifts with n. Here each view is standardised per dimension
  (the MI does not depend on per-dimension scale) and projected on the same ``dims``
  leading eigenvectors of the pooled covariance, and the MI of the projections is
  debiased (``gaussian_mi(debias=True)``). The directions are chosen on one half of the
  batch and the MI is measured on the other, then the halves swap and the two are
  averaged: directions chosen and measured on the same rows would favour the ones whose
  sample noise happens to agree across the views (on isotropic Gaussian views, d = 128,
  n = 2048, k = 32: 6.26 nats read for 4.60 true; tests/test_objectives.py). A projection cannot add information, so this is
  a lower bound on the full Gaussian MI, up to the estimation error. At dims = 16 on a
  CIFAR-10 ResNet's 128-dimensional embeddings it moved by 0.2 nats (trained) and 0.5
  (untrained) between n = 512 and 8192, where the plug-in estimate of all 128 dimensions
  moved by 7, more than training had changed it (BENCHMARKS.md).

  Uses eigh: for evaluation batches, not the training hot path.

  Args:
    za, zb: (n, d) embeddings of the two views (an odd last row is left out).
    dims: k, the number of principal directions kept (k <= d and n / 2 > 2k);
      default ``default_principal_dims(n, d)`` = min(d, n // 32).
    eps: ridge on the standardised projections' covariances (keeps collapsed
      directions finite).
  """
  n, d = za.shape
  half = n // 2
  k = default_principal_dims(n, d) if dims is None else dims
  if not 1 <= k <= d or half <= 2 * k:
    raise ValueError(f"principal_gaussian_mi needs 1 <= dims <= d and n / 2 > 2 dims; got dims={k}, n={n}, d={d}.")
  sa, sb = standardize(za), standardize(zb)
  halves = (slice(0, half), slice(half, 2 * half))
  estimates = []
  for chosen, measured in (halves, halves[::-1]):
    top = jax.lax.stop_gradient(_leading_directions(sa[chosen], sb[chosen], k))
    ua, ub = standardize(sa[measured] @ top), standardize(sb[measured] @ top)
    estimates.append(gaussian_mi(ua, ub, form="joint", eps=eps, debias=True))
  return 0.5 * (estimates[0] + estimates[1])


def mi_estimates(za: Array, zb: Array, tau: float = 1.0, gaussian_dims: int | None = None) -> dict[str, Array]:
  """All four estimates on one batch: DV, InfoNCE, JSD (cosine critic) and Gaussian.

  The Gaussian one is ``principal_gaussian_mi``: debiased, in the leading
  ``gaussian_dims`` principal directions (default min(d, n // 32)), so that a batch
  smaller than the embedding is wide still gives a readable, finite value. Compare it
  across the steps of a run (fixed n and d) or between runs with the same dims: a larger
  subspace holds more MI.
  """
  za = jax.lax.stop_gradient(za)
  zb = jax.lax.stop_gradient(zb)
  return {
      "mi_dv": dv(za, zb, tau),
      "mi_infonce": infonce(za, zb, tau),
      "mi_jsd": jsd(za, zb, tau),
      "mi_gaussian": principal_gaussian_mi(za, zb, gaussian_dims),
  }
