"""Evaluators that run inside training, each at its own cadence (and the evaluation
program's kNN and linear probe).

An evaluator in training is a small object with a ``name``, an ``every_steps`` (0: off),
``at_start`` (whether it also runs before the first step) and ``run(state) -> metrics``.
``make_evaluators`` builds those the config turns on, from a registry of builders
``(config, context) -> evaluator``: the loop iterates over them and knows none by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import ml_collections


class Evaluator(Protocol):
  name: str
  every_steps: int
  at_start: bool

  def run(self, state) -> dict[str, float]:
    """Metrics of the train state ``state`` (host floats)."""


@dataclasses.dataclass(frozen=True)
class Context:
  """What evaluators are built from, besides the config: the step's static parts, the
  training data (its decoded subsets), the mesh, and an example state to compile for."""

  parts: Any
  data: Any
  mesh: Any
  state: Any
  # What the run's programs are a function of (emim.compiled): an evaluator's programs
  # are reused by a later run of the same config in this process. None: not reused.
  program_key: str | None = None


_BUILDERS: dict[str, Callable[[ml_collections.ConfigDict, Context], Evaluator | None]] = {}


def register(name: str):
  """Decorator: ``build(config, context) -> Evaluator``, or None when the config turns
  it off."""

  def wrap(build):
    _BUILDERS[name] = build
    return build

  return wrap


def make_evaluators(config: ml_collections.ConfigDict, context: Context) -> list[Evaluator]:
  from emim.evaluators import knn, mi_tracker  # noqa: F401  (registration)

  built = (build(config, context) for build in _BUILDERS.values())
  return [e for e in built if e is not None and e.every_steps > 0]


def due(evaluator: Evaluator, step: int, last_step: int) -> bool:
  """Whether ``evaluator`` runs after ``step``: on its cadence, and at the last step."""
  return step % evaluator.every_steps == 0 or step == last_step
