"""MI estimates on a fixed evaluation batch, tracked during training (docs/objective.md).

The same examples and the same augmentation keys every time, the encoder in inference
mode and no gradient, so the curve shows how the encoder's MI between two views evolves:
DV, InfoNCE and JSD with the cosine critic, and the Gaussian (second-order) MI, debiased,
in the batch's leading principal directions (``principal_gaussian_mi``), with the
effective rank and embedding std.

Beside the online encoder's two views, the pair the method's critic scores where that is
another pair (``Method.critic_pair``): for the SDMI family the online branch with its
predictor, h(f(x_a)), against the target branch g(x_b); for EMMI with a momentum target
the online projection against the target's. Logged as ``eval/branch_mi_*``, each
symmetrised over the views, 1/2 [I(a(x1); b(x2)) + I(a(x2); b(x1))], as the losses are:
the online pair says what the encoder keeps, the branch pair what the method maximises.
Beside them the effective rank of each side of the pair
(``eval/branch_effective_rank_online`` of a(x1), ``_target`` of b(x1)).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_collections

from emim import compiled, sharding
from emim import objectives as O
from emim.data.sources import known_views_mi
from emim.evaluators import Context, register
from emim.train_step import StepParts, TrainState, make_views

_EVAL_KEY = 20261122  # fixed: the same views at every evaluation


def online_embeddings(parts: StepParts, state: TrainState, inputs: jax.Array):
  """(features, projections) of the online encoder in inference mode."""
  variables = {"params": state.params["encoder"], "batch_stats": state.batch_stats["encoder"]}
  return parts.encoder.apply(variables, inputs, train=False)


def branch_embedding(parts: StepParts, state: TrainState, which: str, x: jax.Array, z: jax.Array) -> jax.Array:
  """One side of the method's critic pair in inference mode, for the view ``x`` whose
  online projection is ``z``: "proj" (z itself), "pred" (the predictor on z) or "target"
  (the target encoder's projection of x)."""
  if which == "proj":
    return z
  if which == "pred":
    variables = {"params": state.params["predictor"], "batch_stats": state.batch_stats["predictor"]}
    return parts.predictor.apply(variables, z, train=False)
  if which == "target":
    return parts.encoder.apply(state.target, x, train=False)[1]
  raise ValueError(f"Unknown branch {which!r}; Method.critic_pair names 'proj', 'pred' or 'target'.")


def make_mi_tracker(parts: StepParts, tau: float = 0.1, objective_eps: float = 1e-4):
  """A jitted fn(state, inputs) -> metrics on two fixed views of ``inputs`` (a batch:
  {"images": ...} or {"vectors": ...}).

  Args:
    parts: the train step's static pieces (the method decides the branch pair).
    tau: the cosine critic's temperature.
    objective_eps: the objective's ridge, for the rescaled spectrum.

  Returns:
    fn(state, inputs) -> {"eval/mi_dv": ..., ...}: the online pair's estimates and
    diagnostics, and ``eval/branch_mi_*`` where ``parts.method.critic_pair`` names another
    pair.
  """
  pair = parts.method.critic_pair

  @jax.jit
  def track(state: TrainState, inputs: dict):
    x1, x2 = make_views(parts, jax.random.PRNGKey(_EVAL_KEY), jnp.int32(0), inputs)
    _, z1 = online_embeddings(parts, state, x1)
    _, z2 = online_embeddings(parts, state, x2)
    estimates = O.mi_estimates(z1, z2, tau=tau)
    if pair is not None:
      a1, a2 = (branch_embedding(parts, state, pair[0], x, z) for x, z in ((x1, z1), (x2, z2)))
      b1, b2 = (branch_embedding(parts, state, pair[1], x, z) for x, z in ((x1, z1), (x2, z2)))
      forward, backward = O.mi_estimates(a1, b2, tau=tau), O.mi_estimates(a2, b1, tau=tau)
      estimates.update({f"branch_{k}": 0.5 * (forward[k] + backward[k]) for k in forward})
      # Each side's spread: a branch pair can lose its MI by one side collapsing.
      estimates["branch_effective_rank_online"] = O.effective_rank(a1)
      estimates["branch_effective_rank_target"] = O.effective_rank(b1)
    # Once, while tracing: which subspace the logged Gaussian MI is of.
    logging.info("MI estimates on %d fixed examples; the Gaussian MI of the %d leading principal directions (of %d).",
                 z1.shape[0], O.default_principal_dims(*z1.shape), z1.shape[1])
    # The smallest eigenvalue of each symmetric-form statistic over its lambda_max: how far
    # into the Taylor polynomial's flat tail the spectrum reaches (exact, eigvalsh).
    spectrum = O.rescaled_spectrum(z1, z2, eps=objective_eps)
    return {
        **{f"eval/{k}": v for k, v in estimates.items()},
        "eval/effective_rank": O.effective_rank(z1),
        "eval/embedding_std": O.embedding_std(z1),
        **{f"eval/{k}": v for k, v in spectrum.items() if k.startswith("rescaled_eig_min")},
    }

  return track


class MiTracker:
  """The MI estimates of the online encoder (and of the method's branch pair) on a fixed
  batch of training examples, every ``every_steps`` steps (by default with every progress
  line) and before the first; beside them ``eval/true_mi``, the exact MI of two views of
  the data, where it is known (the Gaussian mixture: every estimate of the embeddings'
  MI lies below it)."""

  name, at_start = "mi", True

  def __init__(self, parts: StepParts, state: TrainState, inputs: dict, every_steps: int, objective_eps: float,
               true_mi: float | None = None, program_key: str | None = None):
    self.every_steps = every_steps
    self._inputs = inputs
    self._true_mi = true_mi
    build = lambda: make_mi_tracker(parts, objective_eps=objective_eps).lower(state, inputs).compile()
    if program_key is None:
      self._track = build()
    else:
      key = compiled.key_of(program_key, compiled.signature(inputs), objective_eps)
      self._track = compiled.once("mi_tracker", key, build)

  def run(self, state: TrainState) -> dict[str, float]:
    # Wait for every device's copy, not only the one device_get reads: the estimates are
    # replicated, and a step dispatched (and a checkpoint begun) while other devices still
    # run the tracker wedged the 8-device CPU tests twice, every thread parked.
    evals = jax.device_get(jax.block_until_ready(self._track(state, self._inputs)))
    known = {} if self._true_mi is None else {"eval/true_mi": self._true_mi}
    return {**{k: float(v) for k, v in evals.items()}, **known}


def batch_layout(num_examples: int, batch_size: int, mesh) -> tuple[int, jax.sharding.NamedSharding]:
  """(the size of the tracker's fixed batch, its sharding): up to ``batch_size``
  examples, split over the data axis (a multiple of the devices), so that each chip
  embeds its share. Replicated, every chip had embedded the whole batch: on a v5e-16,
  8.8 TFLOP per chip for ImageNet's 512, 16 times the work (python -m emim.aot).
  Replicated only when there are fewer examples than devices."""
  n = min(num_examples, batch_size)
  devices = mesh.devices.size
  if n < devices:
    return n, sharding.replicated(mesh)
  return n - n % devices, sharding.batch_sharding(mesh)


@register("mi")
def build(config: ml_collections.ConfigDict, context: Context) -> MiTracker | None:
  every_steps = config.train.log_every if config.eval.mi_every_steps < 0 else config.eval.mi_every_steps
  if every_steps == 0:
    return None
  data = context.data
  # A fixed random subset of the training examples.
  n, spec = batch_layout(data.num_examples, config.eval.mi_batch_size, context.mesh)
  subset = data.train_subset(n, seed=1)
  inputs = {subset.input_key: sharding.put_global(subset.inputs, spec)}
  return MiTracker(context.parts, context.state, inputs, every_steps, config.method.get("eps", 1e-4),
                   known_views_mi(config), context.program_key)
