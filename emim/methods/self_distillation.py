"""SDMI methods (the SDMI/JMI paper): an online branch with a predictor regressed onto a target
branch under stop-gradient. BYOL (EMA target), SimSiam (shared weights), MoCo v3 (EMA +
InfoNCE against the target) and the canonical SDMI prototype (-cos, its target trained
by alternating gradient steps, or an EMA).

The prototype's two steps, from the DV bound (docs/objective.md) with the critic
T = cos / tau on za = h(f_theta(x_a)) and zb = g_xi(x_b):

    L(theta, xi) = J - M,   J = E_p T(za, zb),   M = log E_{p(za) p(zb)} exp T(za, zb).

Block-coordinate ascent alternates an E-step, theta (online encoder f and predictor h)
ascending L with xi fixed, and an M-step, xi (target g) ascending L with theta fixed;
L then never falls, which is the monotone ascent the SDMI/JMI paper's proposition promises. The
prototype as the paper writes it ascends J alone in both steps (-cos). In the E-step the
predictor stands in for M: with g fixed and spread, the J-optimal h(f(x_a)) is the
direction of E[g(x_b) | x_a], which cannot make g collapse. The M-step has no such
stand-in: the J-optimal g(x_b) is the direction of E[h(f(x_a)) | x_b], and J is as high
for a g that points every input along h(f)'s common direction; J's maximum, h(f) and g
one constant vector, is L = 0. Alternating steps of J alone walk there (on the Gaussian
mixture h(f) and g end at effective rank ~2 and their pair's InfoNCE at ~0.1 nats, while
f, behind the predictor, keeps rank 4.7). ``marginal_term`` says which steps ascend the
whole bound (``O.sdmi_dv_loss``: M as the batch's log mean over unmatched pairs of
exp T): "target_step", the default, gives the M-step the marginal term it has no
surrogate for, and the pair's MI rises near-monotonically; "none" is the paper's
prototype as written (BENCHMARKS.md, "The SDMI prototype examined").

The SDMI/JMI paper's ablations are switches of the method config: ``predictor=False`` regresses the
online projection itself; ``stop_gradient=False`` lets the loss's gradient into the
target branch (SimSiam's shared weights; the SDMI prototype's target, both branches then
ascending together).
"""

from __future__ import annotations

import functools

import jax

from emim import objectives as O
from emim.config_base import ConfigError
from emim.methods.base import Method, Views, register, symmetrized
from emim.methods.defaults import TARGET_UPDATES


def _sdmi_method(name, pair_loss, uses_target, predictor=True, stop_gradient=True, target_update="ema",
                 alternate_every=1, target_pair_loss=None):
  pair_loss = functools.partial(pair_loss, stop_gradient=stop_gradient and target_update == "ema")

  def loss_of(pair_loss):
    def loss_fn(views: Views, state):
      anchors = views.pred if predictor else views.proj
      targets = views.target if uses_target else views.proj
      loss, metrics = symmetrized(pair_loss, anchors, targets)
      return loss, state, metrics

    return loss_fn

  return Method(name=name, paradigm="sdmi", uses_target=uses_target, uses_predictor=predictor,
                loss_fn=loss_of(pair_loss), target_update=target_update, alternate_every=alternate_every,
                target_loss_fn=None if target_pair_loss is None else loss_of(target_pair_loss))


@register("byol")
def build_byol(cfg):
  return _sdmi_method("byol", O.byol_loss, uses_target=True, predictor=cfg.predictor)


@register("simsiam")
def build_simsiam(cfg):
  return _sdmi_method("simsiam", O.simsiam_loss, uses_target=False, predictor=cfg.predictor,
                      stop_gradient=cfg.stop_gradient)


@register("moco")
def build_moco(cfg):
  return _sdmi_method("moco", functools.partial(O.moco_infonce, tau=cfg.tau), uses_target=True, predictor=cfg.predictor)


# Which gradient steps of the SDMI prototype ascend the whole DV bound J - M
# (``sdmi_dv_loss``) rather than J alone (-cos): "none" (the paper's prototype as
# written), "target_step" (the default: the M-step, whose branch has no predictor to
# stand in for M; an EMA target takes no gradient step, so there it changes nothing) or
# "both_steps" (the E-step too).
MARGINAL_TERMS = ("none", "target_step", "both_steps")


def _cos_reporting_marginal(online_pred, target_proj, tau, stop_gradient=False):
  """-cos (J alone), reporting the marginal term M beside it (no gradient through it): an
  E-step's metrics then have the same keys as a DV M-step's."""
  loss, metrics = O.sdmi_prototype_loss(online_pred, target_proj, stop_gradient=stop_gradient)
  sg = jax.lax.stop_gradient
  return loss, {**metrics, "marginal": O.sdmi_dv_loss(sg(online_pred), sg(target_proj), tau)[1]["marginal"]}


@register("sdmi")
def build_sdmi(cfg):
  update = cfg.get("target_update", "ema")  # (absent from configs saved before it existed)
  if update not in TARGET_UPDATES:
    raise ConfigError(f"--config.method.target_update={update!r}: choose one of {TARGET_UPDATES}.")
  every = cfg.get("alternate_every", 1)
  if not isinstance(every, int) or every <= 0:
    raise ConfigError(f"--config.method.alternate_every={every!r}: give a positive number of steps per phase.")
  if not cfg.get("stop_gradient", True):
    if update == "ema":
      raise ConfigError("The SDMI prototype without stop-gradient needs a target that gradients train: its EMA "
                        "target receives no gradient either way. Use --config.method.target_update=alternating "
                        "(the default) with the no_stop_gradient variant.")
    update = "joint"
  marginal = cfg.get("marginal_term", "none")  # (absent from configs saved before it: the prototype as written)
  if marginal not in MARGINAL_TERMS:
    raise ConfigError(f"--config.method.marginal_term={marginal!r}: choose one of {MARGINAL_TERMS}.")
  scale = cfg.get("target_lr_scale", 1.0)
  if not (isinstance(scale, (int, float)) and scale > 0):
    raise ConfigError(f"--config.method.target_lr_scale={scale!r}: give the target's learning rate over the online "
                      "one's, a positive number (1: the same).")
  if scale != 1 and update == "ema":
    raise ConfigError(f"--config.method.target_lr_scale={scale!r} scales a trained target's steps; the EMA target "
                      "takes none. Use it with --config.method.target_update=alternating.")
  tau = cfg.get("critic_tau", 0.1)
  if not tau > 0:
    raise ConfigError(f"--config.method.critic_tau={tau!r}: the critic cos / tau needs a positive temperature, "
                      "e.g. 0.1.")
  dv_loss = functools.partial(O.sdmi_dv_loss, tau=tau)
  # With the marginal term in a step, both steps report M, whichever they ascend.
  online_loss = {"none": O.sdmi_prototype_loss, "target_step": functools.partial(_cos_reporting_marginal, tau=tau),
                 "both_steps": dv_loss}[marginal]
  return _sdmi_method("sdmi", online_loss, uses_target=True, predictor=cfg.predictor, target_update=update,
                      alternate_every=every, target_pair_loss=None if marginal == "none" else dv_loss)
