"""SDMI methods (seed 002): an online branch with a predictor regressed onto a target
branch under stop-gradient. BYOL (EMA target), SimSiam (shared weights), MoCo v3 (EMA +
InfoNCE against the target) and the canonical SDMI prototype (EMA + -cos)."""

from __future__ import annotations

import functools

from emim import objectives as O
from emim.methods.base import Method, Views, register, symmetrized


def _sdmi_method(name, pair_loss, uses_target, predictor=True):
  def loss_fn(views: Views, state):
    anchors = views.pred if predictor else views.proj
    targets = views.target if uses_target else views.proj
    loss, metrics = symmetrized(pair_loss, anchors, targets)
    return loss, state, metrics

  return Method(name=name, paradigm="sdmi", uses_target=uses_target, uses_predictor=predictor, loss_fn=loss_fn)


@register("byol")
def build_byol(cfg):
  return _sdmi_method("byol", O.byol_loss, uses_target=True)


@register("simsiam")
def build_simsiam(cfg):
  return _sdmi_method("simsiam", O.simsiam_loss, uses_target=False)


@register("moco")
def build_moco(cfg):
  return _sdmi_method("moco", functools.partial(O.moco_infonce, tau=cfg.tau), uses_target=True, predictor=cfg.predictor)


@register("sdmi")
def build_sdmi(cfg):
  return _sdmi_method("sdmi", O.sdmi_prototype_loss, uses_target=True, predictor=cfg.predictor)
