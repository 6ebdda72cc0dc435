"""Embedding diagnostics every run logs (docs/objective.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from emim.objectives.gaussian import _renyi2_rank_of_factor, centred, covariance, covariance_factors
from emim.objectives.precision import float32_products

Array = jax.Array


def embedding_std(z: Array) -> Array:
  """Mean over dimensions of the per-dimension std of l2-normalised embeddings.

  A collapsed representation gives 0; a well spread one about 1/sqrt(d).
  """
  z = z.astype(jnp.float32)
  z = z / (jnp.linalg.norm(z, axis=1, keepdims=True) + 1e-12)
  return jnp.mean(jnp.std(z, axis=0))


def renyi2_rank(z: Array) -> Array:
  """exp(Renyi-2 entropy) of the normalised spectrum of cov(z): tr(S)^2 / tr(S^2).

  Traces only, so cheap enough for every step; a lower bound of ``effective_rank``.
  """
  # The ratio is scale-free, so the centred samples serve as the factor of S.
  return _renyi2_rank_of_factor(centred(z))


def effective_rank(z: Array) -> Array:
  """exp(Shannon entropy) of the normalised eigenvalues of cov(z) (Roy & Vetterli).

  Uses eigvalsh: for evaluation batches, not the training hot path.
  """
  lam = jnp.clip(jnp.linalg.eigvalsh(covariance(z)), 0.0, None)
  p = lam / (jnp.sum(lam) + 1e-30)
  return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


@float32_products
def rescaled_spectrum(z1: Array, z2: Array, eps: float, rescale_c: float = 1.0) -> dict[str, Array]:
  """Extreme eigenvalues of each symmetric-form statistic over beta = c * lambda_max.

  The exact counterpart (eigvalsh) of what the Taylor backend tracks by power
  iteration; the minimum tells how far into the polynomial's flat tail the spectrum is.
  """
  out = {}
  for name, x in covariance_factors(z1, z2, "symmetric").items():
    lam = jnp.linalg.eigvalsh(x.T @ x) + eps
    beta = rescale_c * lam[-1]
    out[f"rescaled_eig_min_{name}"] = lam[0] / beta
    out[f"rescaled_eig_max_{name}"] = lam[-1] / beta
  return out
