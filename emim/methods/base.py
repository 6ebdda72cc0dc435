"""What a method is: an objective plus what it needs (target network, predictor).

The train step forwards both views through the online encoder (and the predictor and
the EMA target when the method asks for them), packs the outputs into ``Views`` and
hands them to ``Method.loss``. Everything method-specific lives in the method's file;
the step has no ``if method == ...``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections

from emim.config_base import ConfigError
from emim.methods import defaults

Array = jax.Array
Metrics = dict[str, Array]


@dataclasses.dataclass(frozen=True)
class Views:
  """Embeddings of the two views. ``pred`` and ``target`` are None when unused."""

  proj: tuple[Array, Array]
  pred: tuple[Array, Array] | None = None
  target: tuple[Array, Array] | None = None


@dataclasses.dataclass(frozen=True)
class Method:
  """A self-supervised method.

  Attributes:
    name: registry name.
    paradigm: "emmi", "sdmi" or "jmi" (the SDMI/JMI paper's families).
    uses_target: keep an EMA target encoder (its own field of the train state).
    uses_predictor: put a predictor MLP on the online branch.
    loss_fn: (views, objective_state) -> (loss, objective_state, metrics).
    init_objective_state: projection dim -> the objective's state (e.g. tracked eigenvalues).
    target_update: how the target learns: "ema" (a momentum average of the online
      encoder), "alternating" (its own gradient steps on the same objective, alternating
      with the online branch's every ``alternate_every`` steps: the canonical SDMI
      prototype's block-coordinate ascent) or "joint" (both branches every step).
    target_loss_fn: the objective of the target's own gradient steps (the SDMI
      prototype's M-step) where it differs from ``loss_fn``; None: the same. Its metrics
      must have the same keys as ``loss_fn``'s (one lax.cond runs either step).
  """

  name: str
  paradigm: str
  uses_target: bool
  uses_predictor: bool
  loss_fn: Callable[[Views, Any], tuple[Array, Any, Metrics]]
  init_objective_state: Callable[[int], Any] = lambda dim: {}
  target_update: str = "ema"
  alternate_every: int = 1
  target_loss_fn: Callable[[Views, Any], tuple[Array, Any, Metrics]] | None = None

  def loss(self, views: Views, objective_state: Any) -> tuple[Array, Any, Metrics]:
    return self.loss_fn(views, objective_state)

  def target_loss(self, views: Views, objective_state: Any) -> tuple[Array, Any, Metrics]:
    """The loss the target's gradient step descends (``target_loss_fn``, else ``loss_fn``)."""
    return (self.target_loss_fn or self.loss_fn)(views, objective_state)

  @property
  def critic_pair(self) -> tuple[str, str] | None:
    """The two embeddings the method's critic scores, (anchor, target), when they are not
    the online encoder's two projections: each one of "proj" (the online projection),
    "pred" (the predictor on it) or "target" (the target encoder's projection), the anchor
    of one view against the target of the other. SDMI: the online branch (with its
    predictor) against the target branch, the shared encoder's projection when there is
    no target (SimSiam). EMMI with a target: the online projection against the target's.
    None where the online pair already is the method's pair (JMI; EMMI or an SDMI method
    without target and predictor): the MI tracker then logs it once."""
    if self.paradigm == "sdmi":
      pair = ("pred" if self.uses_predictor else "proj", "target" if self.uses_target else "proj")
    elif self.paradigm == "emmi" and self.uses_target:
      pair = ("proj", "target")
    else:
      return None
    return None if pair == ("proj", "proj") else pair


_BUILDERS: dict[str, Callable[[ml_collections.ConfigDict], Method]] = {}


def register(name: str):
  """Decorator: register ``build(method_cfg) -> Method`` under ``name``, a method whose
  default config is in defaults.py."""

  def wrap(build):
    if name in _BUILDERS:
      raise ValueError(f"Method {name!r} registered twice.")
    if name not in defaults.available():
      raise ValueError(f"Method {name!r} has no default config in emim/methods/defaults.py.")
    _BUILDERS[name] = build
    return build

  return wrap


def make_method(method_cfg: ml_collections.ConfigDict) -> Method:
  if method_cfg.name not in _BUILDERS:
    raise ConfigError(f"--config.method.name={method_cfg.name!r}: registered methods: {', '.join(sorted(_BUILDERS))}.")
  return _BUILDERS[method_cfg.name](method_cfg)


def symmetrized(loss_pair: Callable[[Array, Array], tuple[Array, Metrics]], a: tuple[Array, Array], b: tuple[Array, Array]):
  """1/2 [loss(a0, b1) + loss(a1, b0)]: each view predicts the other."""
  l1, m1 = loss_pair(a[0], b[1])
  l2, m2 = loss_pair(a[1], b[0])
  return 0.5 * (l1 + l2), jax.tree.map(lambda x, y: 0.5 * (x + y), m1, m2)
