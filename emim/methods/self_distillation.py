"""SDMI methods (seed 002): an online branch with a predictor regressed onto a target
branch under stop-gradient. BYOL (EMA target), SimSiam (shared weights), MoCo v3 (EMA +
InfoNCE against the target) and the canonical SDMI prototype (-cos, its target trained
by alternating gradient steps, or an EMA).

Seed 002's ablations are switches of the method config: ``predictor=False`` regresses the
online projection itself; ``stop_gradient=False`` lets the loss's gradient into the
target branch (SimSiam's shared weights; the SDMI prototype's target, both branches then
ascending together).
"""

from __future__ import annotations

import functools

from emim import objectives as O
from emim.config_base import ConfigError
from emim.methods.base import Method, Views, register, symmetrized
from emim.methods.defaults import TARGET_UPDATES


def _sdmi_method(name, pair_loss, uses_target, predictor=True, stop_gradient=True, target_update="ema",
                 alternate_every=1):
  pair_loss = functools.partial(pair_loss, stop_gradient=stop_gradient and target_update == "ema")

  def loss_fn(views: Views, state):
    anchors = views.pred if predictor else views.proj
    targets = views.target if uses_target else views.proj
    loss, metrics = symmetrized(pair_loss, anchors, targets)
    return loss, state, metrics

  return Method(name=name, paradigm="sdmi", uses_target=uses_target, uses_predictor=predictor, loss_fn=loss_fn,
                target_update=target_update, alternate_every=alternate_every)


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
  return _sdmi_method("sdmi", O.sdmi_prototype_loss, uses_target=True, predictor=cfg.predictor,
                      target_update=update, alternate_every=every)
