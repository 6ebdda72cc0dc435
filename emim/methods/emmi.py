"""EMMI (seeds 000/001): maximise the second-order MI between the two views' embeddings,
with the Taylor surrogate of the log-determinant and, by default, a momentum target."""

from __future__ import annotations

import jax
import ml_collections

from emim import objectives as O
from emim.config_base import ConfigError
from emim.methods.base import Method, Views, register


def emmi_config(cfg: ml_collections.ConfigDict) -> O.EmmiConfig:
  try:  # the objectives check their own values; here they are config fields
    logdet = O.LogdetConfig(
        backend=cfg.backend, eps=cfg.eps, order=cfg.order, rescale=cfg.rescale, rescale_c=cfg.rescale_c,
        eig_momentum=cfg.eig_momentum, power_iters=cfg.power_iters)
    return O.EmmiConfig(form=cfg.form, logdet=logdet, w_inv=cfg.w_inv, smoothing=cfg.smoothing)
  except ValueError as e:
    raise ConfigError(f"--config.method (backend, eps, order, rescale, rescale_c, form, smoothing): {e}") from e


NORMALIZATIONS = {"none": lambda z: z, "l2": O.l2_normalize}


@register("emmi")
def build(cfg: ml_collections.ConfigDict) -> Method:
  loss_cfg = emmi_config(cfg)
  if cfg.normalize not in NORMALIZATIONS:
    raise ConfigError(f"--config.method.normalize={cfg.normalize!r}: choose one of {', '.join(NORMALIZATIONS)}.")
  norm = lambda pair: tuple(map(NORMALIZATIONS[cfg.normalize], pair))

  def loss_fn(views: Views, state):
    proj = norm(views.proj)
    if views.target is None:  # one shared encoder: both views carry gradients
      return O.emmi_loss(proj[0], proj[1], state, loss_cfg)
    # With a target, z2 carries no gradient; symmetrise by swapping the views. Both
    # halves start from this step's objective state and their updates are averaged, so
    # that the tracked eigenvalues' EMA (and the smoothed covariances) move once per step,
    # by method.eig_momentum, as without a target: threaded through both halves it would
    # move twice, acting as eig_momentum squared.
    sg = jax.lax.stop_gradient
    target = norm(views.target)
    l1, s1, m1 = O.emmi_loss(proj[0], sg(target[1]), state, loss_cfg)
    l2, s2, m2 = O.emmi_loss(proj[1], sg(target[0]), state, loss_cfg)
    metrics = jax.tree.map(lambda a, b: 0.5 * (a + b), m1, m2)
    return 0.5 * (l1 + l2), O.average_emmi_states(s1, s2), metrics

  return Method(
      name="emmi", paradigm="emmi", uses_target=cfg.target, uses_predictor=False, loss_fn=loss_fn,
      init_objective_state=lambda dim: O.init_emmi_state(dim, loss_cfg))
