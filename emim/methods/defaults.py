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
      order=4,  # Taylor order K (seed 001, Figure 3)
      # "max_eig" (tracked lambda_max) or "trace" (c tr(A)/d; it diverged on CIFAR-10: a
      # spread spectrum scaled by its mean leaves the series' region (0, 2)).
      rescale="max_eig",
      rescale_c=1.0,
      eig_momentum=0.9,
      power_iters=3,
      w_inv=1.0,  # weight of the joint-entropy terms; 1 is the pure MI
      smoothing=0.0,  # covariance smoothing lam (CorInfoMax: 0.01); 0 = batch statistics
      # "l2": each embedding on the unit sphere before the statistics. The surrogate is not
      # scale-invariant as the exact MI is (beta is a stopped constant), and without it the
      # embedding scale is free to drift (BENCHMARKS.md, "CIFAR-10 variants side by side").
      normalize="none",
      target=True,  # momentum encoder
      target_momentum=0.99,  # m0 of the cosine schedule to 1
  )


def _with_target(**kw) -> dict:
  return dict(target_momentum=0.99, **kw)


_DEFAULTS = {
    "emmi": _emmi,
    # SDMI (self_distillation.py).
    "byol": _with_target,
    "simsiam": dict,
    "moco": lambda: _with_target(tau=0.2, predictor=True),
    # predictor=False is seed 002's ablation: without it the representation collapses.
    "sdmi": lambda: _with_target(predictor=True),
    # JMI (joint.py).
    "simclr": lambda: dict(tau=0.5),
    "barlow_twins": lambda: dict(lambd=5e-3),
    "vicreg": lambda: dict(sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0),
    # lambd=0 is seed 002's ablation: without the regulariser the representation collapses.
    "taylor_dv": lambda: dict(lambd=1.0),
}


def available() -> list[str]:
  return sorted(_DEFAULTS)


def method_config(name: str) -> ml_collections.ConfigDict:
  """The default config of a method (with ``name`` set)."""
  if name not in _DEFAULTS:
    raise ValueError(f"Unknown method {name!r}; registered methods: {', '.join(available())}.")
  return ml_collections.ConfigDict(dict(_DEFAULTS[name](), name=name))
