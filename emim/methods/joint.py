"""JMI methods (the SDMI/JMI paper): one shared encoder, both branches get gradients, a statistical
regulariser in place of the DV bound's log-partition. SimCLR, Barlow Twins, VICReg and
the canonical Taylor-DV prototype. ``regularizer=False`` (the SDMI/JMI paper's ablation) keeps the
joint term alone: SimCLR without its negatives, Barlow Twins without its off-diagonal
term, VICReg without variance and covariance, Taylor-DV without its marginal term."""

from __future__ import annotations

import functools

from emim import objectives as O
from emim.methods.base import Method, Views, register


def _jmi_method(name, pair_loss):
  def loss_fn(views: Views, state):
    loss, metrics = pair_loss(views.proj[0], views.proj[1])
    return loss, state, metrics

  return Method(name=name, paradigm="jmi", uses_target=False, uses_predictor=False, loss_fn=loss_fn)


@register("simclr")
def build_simclr(cfg):
  return _jmi_method("simclr", functools.partial(O.nt_xent, tau=cfg.tau, negatives=cfg.get("regularizer", True)))


@register("barlow_twins")
def build_barlow_twins(cfg):
  lambd = cfg.lambd if cfg.get("regularizer", True) else 0.0
  return _jmi_method("barlow_twins", functools.partial(O.barlow_twins, lambd=lambd))


@register("vicreg")
def build_vicreg(cfg):
  keep = 1.0 if cfg.get("regularizer", True) else 0.0
  return _jmi_method("vicreg", functools.partial(O.vicreg, sim_coeff=cfg.sim_coeff, std_coeff=keep * cfg.std_coeff,
                                                 cov_coeff=keep * cfg.cov_coeff))


@register("taylor_dv")
def build_taylor_dv(cfg):
  lambd = cfg.lambd if cfg.get("regularizer", True) else 0.0
  return _jmi_method("taylor_dv", functools.partial(O.taylor_dv, lambd=lambd))
