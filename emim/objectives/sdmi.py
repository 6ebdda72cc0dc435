"""Self-distillation (SDMI) losses: an online branch (with a predictor) regressed onto a
target branch under stop-gradient (the SDMI/JMI paper; docs/objective.md). The ``stop_gradient`` is
written here, where the paper puts it, so a target can never receive a gradient unless
a method asks for it (the SDMI prototype's alternating updates, the ablations).
Each returns (loss, metrics); symmetrise over the two views in the method."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from emim.objectives.estimators import l2_normalize

Array = jax.Array
sg = jax.lax.stop_gradient


def cosine_similarity(a: Array, b: Array) -> Array:
  """Row-wise cos(a_i, b_i) in float32."""
  return jnp.sum(l2_normalize(a) * l2_normalize(b), axis=-1)


def _maybe_sg(x: Array, stop_gradient: bool) -> Array:
  return sg(x) if stop_gradient else x


def byol_loss(online_pred: Array, target_proj: Array, stop_gradient: bool = True) -> tuple[Array, dict[str, Array]]:
  """BYOL's normalised regression: mean ||p/|p| - sg(t)/|t| ||^2 = mean 2 - 2 cos(p, sg(t))."""
  cos = cosine_similarity(online_pred, _maybe_sg(target_proj, stop_gradient))
  loss = jnp.mean(2.0 - 2.0 * cos)
  return loss, {"cos": jnp.mean(cos)}


def moco_infonce(query: Array, key: Array, tau: float = 0.2, stop_gradient: bool = True) -> tuple[Array, dict[str, Array]]:
  """MoCo v3: cross-entropy of q_i against the batch of target keys sg(k), positive k_i.

  Reported as the plain cross-entropy; MoCo v3 multiplies it by 2 tau, which only
  rescales the learning rate.
  """
  logits = l2_normalize(query) @ l2_normalize(_maybe_sg(key, stop_gradient)).T / tau
  logp = jax.nn.log_softmax(logits, axis=1)
  loss = -jnp.mean(jnp.diagonal(logp))
  accuracy = jnp.mean(jnp.argmax(logits, axis=1) == jnp.arange(logits.shape[0]))
  return loss, {"moco_ce": loss, "moco_acc": accuracy}


def sdmi_prototype_loss(online_pred: Array, target_proj: Array, stop_gradient: bool = True) -> tuple[Array, dict[str, Array]]:
  """The canonical SDMI prototype: only the joint term J with the cosine critic,
  L = -cos(h(f(xa)), sg(g(xb))). ``stop_gradient=False`` for the train step's
  alternating updates, which differentiate one branch at a time themselves, and for the
  no-stop-gradient ablation."""
  cos = cosine_similarity(online_pred, _maybe_sg(target_proj, stop_gradient))
  return -jnp.mean(cos), {"cos": jnp.mean(cos)}


def sdmi_dv_loss(online_pred: Array, target_proj: Array, tau: float = 0.1,
                 stop_gradient: bool = False) -> tuple[Array, dict[str, Array]]:
  """The whole DV bound with the cosine critic T = cos / tau, negated: -(J - M),
  J = mean_i T_ii and M = log mean_{i != j} exp T_ij over the batch's unmatched pairs (the
  same value as ``estimators.dv``, here with its gradient). The SDMI prototype's
  alternating steps use it without stop-gradient (each step differentiates its own
  branch). The metrics are the prototype's (the mean cosine) and the marginal term M."""
  target_proj = _maybe_sg(target_proj, stop_gradient)
  cos = cosine_similarity(online_pred, target_proj)
  t = l2_normalize(online_pred) @ l2_normalize(target_proj).T / tau
  n = t.shape[0]
  marginal = jax.nn.logsumexp(jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, t)) - jnp.log(n * (n - 1.0))
  return -(jnp.mean(cos) / tau - marginal), {"cos": jnp.mean(cos), "marginal": marginal}


# SimSiam's D(p, sg(z)) = -cos(p, sg(z)) is the same loss; what differs is the method
# around it: shared weights on both branches instead of a separate target.
simsiam_loss = sdmi_prototype_loss
