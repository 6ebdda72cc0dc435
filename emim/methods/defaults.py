"""Every method's default config, without JAX: ``configs/`` import this, so loading a
config imports no JAX. The builders (emmi.py, joint.py, self_distillation.py) register
under the same names."""

from __future__ import annotations

import ml_collections


def _emmi() -> dict:
  return dict(
      form="symmetric",  # "symmetric" (three d x d log-dets) or "joint" (one 2d x 2d)
      backend="taylor",  # "taylor" | "cholesky" | "eigh"
      eps=1e-4,
      order=4,  # Taylor order K (the EMMI paper, Figure 3)
      # "max_eig" (tracked lambda_max) or "trace" (c tr(A)/d; it diverged on CIFAR-10: a
      # spread spectrum scaled by its mean leaves the series' region (0, 2)).
      rescale="max_eig",
      rescale_c=1.0,
      eig_momentum=0.9,
      power_iters=3,
      w_inv=1.0,  # weight of the joint-entropy terms; 1 is the pure MI
      smoothing=0.0,  # covariance smoothing lam (CorInfoMax: 0.01); 0 = batch statistics
      # "l2": each embedding on the unit sphere before the statistics (docs/objective.md: the
      # surrogate needs a fixed scale). It is not scale-invariant as the exact MI is (beta
      # is a stopped constant), and without it the embedding's scale drifts: on CIFAR-10
      # (H100, 20 epochs) kNN rose 18 points with it and a 64-d embedding; on the synthetic
      # default (CPU, 960 steps) the surrogate MI ended at +2.0 instead of -8.5 and the
      # effective rank at 54 instead of 20 (BENCHMARKS.md). "none": the raw projection.
      normalize="l2",
      target=True,  # momentum encoder
      target_momentum=0.99,  # m0 of the cosine schedule to 1
  )


def _with_target(**kw) -> dict:
  return dict(target_momentum=0.99, **kw)


# The ablation switches of the SDMI/JMI paper (config variants no_predictor, no_stop_gradient and
# no_regularizer set them False): without its predictor an SDMI method, without its
# regulariser a JMI one, collapses.
_SDMI_SWITCHES = dict(predictor=True)
_JMI_SWITCHES = dict(regularizer=True)

_DEFAULTS = {
    "emmi": _emmi,
    # SDMI (self_distillation.py). BYOL's and MoCo's targets are momentum averages that no
    # gradient reaches: stop-gradient is not a switch of theirs.
    "byol": lambda: _with_target(**_SDMI_SWITCHES),
    "simsiam": lambda: dict(stop_gradient=True, **_SDMI_SWITCHES),
    "moco": lambda: _with_target(tau=0.2, **_SDMI_SWITCHES),
    # The canonical SDMI prototype: -cos(h(f(xa)), sg(g(xb))) by block-coordinate ascent,
    # alternate_every steps of the online branch f (and predictor h), then as many of the
    # target branch g, each with its own optimiser state. target_update="ema" is the
    # stand-in BYOL uses (target_momentum); stop_gradient=False ascends both at once.
    # target_lr_scale: the target's learning rate over the online one's (trained targets).
    # marginal_term: which steps ascend the whole DV bound J - M with the critic
    # cos / critic_tau instead of J alone: "target_step" (the M-step: without M its
    # ascent of J lets g collapse onto h(f), and the pair's MI with it), "none" (the
    # paper's prototype as written), "both_steps" (self_distillation.py; BENCHMARKS.md,
    # "The SDMI prototype examined").
    "sdmi": lambda: _with_target(target_update="alternating", alternate_every=1, stop_gradient=True,
                                 target_lr_scale=1.0, marginal_term="target_step", critic_tau=0.1, **_SDMI_SWITCHES),
    # JMI (joint.py).
    "simclr": lambda: dict(tau=0.5, **_JMI_SWITCHES),
    "barlow_twins": lambda: dict(lambd=5e-3, **_JMI_SWITCHES),
    "vicreg": lambda: dict(sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, **_JMI_SWITCHES),
    "taylor_dv": lambda: dict(lambd=1.0, **_JMI_SWITCHES),
}

# variant -> the method field it turns off.
ABLATIONS = {"no_predictor": "predictor", "no_stop_gradient": "stop_gradient", "no_regularizer": "regularizer"}
TARGET_UPDATES = ("ema", "alternating")


def available() -> list[str]:
  return sorted(_DEFAULTS)


def ablation_methods(variant: str) -> list[str]:
  """The methods an ablation variant applies to."""
  return [m for m in available() if ABLATIONS[variant] in _DEFAULTS[m]()]


def method_config(name: str) -> ml_collections.ConfigDict:
  """The default config of a method (with ``name`` set)."""
  if name not in _DEFAULTS:
    raise ValueError(f"Unknown method {name!r}; registered methods: {', '.join(available())}.")
  return ml_collections.ConfigDict(dict(_DEFAULTS[name](), name=name))
