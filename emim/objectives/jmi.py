"""Joint-paradigm (JMI) losses: one shared encoder, both branches get gradients, and the
intractable log-partition of the DV bound replaced by a statistical regulariser
(the SDMI/JMI paper; docs/objective.md). Each returns (loss, metrics)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from emim.objectives.estimators import l2_normalize
from emim.objectives.gaussian import centred, standardize
from emim.objectives.precision import float32_products

Array = jax.Array


def _off_diagonal(m: Array) -> Array:
  return m - jnp.diag(jnp.diagonal(m))


def nt_xent(z1: Array, z2: Array, tau: float = 0.5, negatives: bool = True) -> tuple[Array, dict[str, Array]]:
  """SimCLR's NT-Xent: InfoNCE over the 2n views, each view's positive its partner.

  loss = mean over the 2n anchors of -log softmax_j(cos(a, j)/tau)[partner], self
  excluded from the denominator. ``negatives=False`` drops the denominator (the
  log-partition): -mean cos(a, partner)/tau, the joint term alone.
  """
  n = z1.shape[0]
  z = l2_normalize(jnp.concatenate([z1, z2], axis=0))
  logits = z @ z.T / tau
  logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, logits)
  partner = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
  logp = jax.nn.log_softmax(logits, axis=1) if negatives else logits
  loss = -jnp.mean(jnp.take_along_axis(logp, partner[:, None], axis=1))
  return loss, {"nt_xent": loss}


@float32_products
def barlow_twins(z1: Array, z2: Array, lambd: float = 5e-3) -> tuple[Array, dict[str, Array]]:
  """Barlow Twins: sum_i (1 - C_ii)^2 + lambda sum_{i != j} C_ij^2, C the cross-correlation
  of the batch-standardised embeddings."""
  n = z1.shape[0]
  c = standardize(z1).T @ standardize(z2) / n
  on_diag = jnp.sum((jnp.diagonal(c) - 1.0) ** 2)
  off_diag = jnp.sum(_off_diagonal(c) ** 2)
  loss = on_diag + lambd * off_diag
  return loss, {"bt_on_diag": on_diag, "bt_off_diag": off_diag}


@float32_products
def vicreg(
    z1: Array, z2: Array, sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0,
    eps: float = 1e-4,
) -> tuple[Array, dict[str, Array]]:
  """VICReg: invariance (MSE) + variance (hinge on the std at 1) + covariance
  (squared off-diagonal covariances / d), as in Bardes et al. 2022."""
  z1 = z1.astype(jnp.float32)
  z2 = z2.astype(jnp.float32)
  n, d = z1.shape
  invariance = jnp.mean((z1 - z2) ** 2)

  def variance_and_covariance(z):
    zc = centred(z)
    std = jnp.sqrt(jnp.sum(zc * zc, axis=0) / (n - 1) + eps)
    cov = zc.T @ zc / (n - 1)
    return jnp.mean(jax.nn.relu(1.0 - std)) / 2, jnp.sum(_off_diagonal(cov) ** 2) / d

  v1, c1 = variance_and_covariance(z1)
  v2, c2 = variance_and_covariance(z2)
  variance, covariance = v1 + v2, c1 + c2
  loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
  return loss, {"vic_invariance": invariance, "vic_variance": variance, "vic_covariance": covariance}


@float32_products
def taylor_dv(za: Array, zb: Array, lambd: float = 1.0) -> tuple[Array, dict[str, Array]]:
  """The canonical JMI prototype (Taylor-DV): -tr(Sab) + lambda/2 tr(Saa Sbb).

  A bilinear critic T = za^T zb on standardised embeddings; the log-partition M of the
  DV bound, expanded to second order under independence, is 1/2 tr(Saa Sbb), which
  penalises every cross-batch correlation, diagonal and off-diagonal.
  """
  n = za.shape[0]
  a, b = standardize(za), standardize(zb)
  s_ab = a.T @ b / n
  s_aa = a.T @ a / n
  s_bb = b.T @ b / n
  joint = jnp.trace(s_ab)
  # tr(Saa Sbb) = sum(Saa * Sbb) for symmetric matrices.
  marginal = 0.5 * jnp.sum(s_aa * s_bb)
  loss = -joint + lambd * marginal
  return loss, {"dv_joint": joint, "dv_marginal": marginal}
