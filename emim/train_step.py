"""The train state and the pure train step: (state, batch) -> (state, metrics).

Randomness comes from the step number (``fold_in(state.rng, step)``, then one key per
example), and the data order from the epoch number, so nothing random is carried and a
resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from emim import objectives as O
from emim.data import augment
from emim.methods import Method, Views
from emim.models import MLP, Encoder
from emim.target import ema_update

Array = jax.Array
# {"images": uint8 (B, H, W, 3), "labels": int32 (B,)}, or for streamed data whose
# random resized crops were taken on the host, {"views": uint8 (B, 2, S, S, 3), "labels"},
# or {"vectors": float32 (B, D), "labels"} (the Gaussian mixture).
Batch = dict[str, Array]
Metrics = dict[str, Array]

# Independent random streams derived from the one base key.
_AUGMENT_STREAM, _DATA_STREAM, _INIT_STREAM, _DROPOUT_STREAM = 0, 1, 2, 3


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue, as one frozen pytree.

  ``target`` (the EMA encoder: params and batch statistics) is its own field and None
  for methods without one; the optimiser sees ``params`` only, so the target can never
  receive a gradient.
  """

  step: Array
  params: dict  # {"encoder": ..., "predictor": ... (when the method has one)}
  batch_stats: dict
  opt_state: optax.OptState
  target: dict | None
  objective_state: Any
  probe_params: dict
  probe_opt_state: optax.OptState
  rng: Array
  # Consecutive steps whose update was refused as non-finite (0 after a finite one); the
  # loop stops the run when it reaches config.train.max_nonfinite_in_a_row.
  refused_in_a_row: Array
  # The target's own optimiser state when gradients train it (the canonical SDMI
  # prototype's alternating updates); None for an EMA target or none.
  target_opt_state: optax.OptState | None = None


@dataclasses.dataclass(frozen=True)
class StepParts:
  """The static pieces of a train step (bound with functools.partial, never traced)."""

  method: Method
  encoder: Encoder
  predictor: MLP | None
  # The same modules taking both views in one call, each view normalised by its own
  # BatchNorm statistics (config.model.fused_views); None: a forward per view.
  views_encoder: Encoder | None
  views_predictor: MLP | None
  tx: optax.GradientTransformation
  probe_tx: optax.GradientTransformation
  momentum_fn: Callable[[Array], Array] | None
  # The target's optimiser when gradients train it (method.target_update "alternating"
  # or "joint"); each branch's schedule counts its own updates (optim.branch_schedule).
  target_tx: optax.GradientTransformation | None
  lr_fn: Callable[[Array], Array]
  view1: ml_collections.ConfigDict
  view2: ml_collections.ConfigDict
  image_size: int
  input_shape: tuple[int, ...]  # one example as the encoder sees it: (S, S, 3) or (D,)
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  num_classes: int


def init_state(parts: StepParts, rng: Array) -> TrainState:
  """A fresh state: initialise online, predictor, target (a copy) and probe."""
  k_enc, k_pred, k_probe = jax.random.split(jax.random.fold_in(rng, _INIT_STREAM), 3)
  x = jnp.zeros((2,) + tuple(parts.input_shape), jnp.float32)
  enc_vars = parts.encoder.init(k_enc, x, train=False)
  params = {"encoder": enc_vars["params"]}
  batch_stats = {"encoder": enc_vars["batch_stats"]}
  features, proj = jax.eval_shape(lambda v: parts.encoder.apply(v, x, train=False), enc_vars)
  if parts.predictor is not None:
    pred_vars = parts.predictor.init(k_pred, jnp.zeros(proj.shape, jnp.float32), train=False)
    params["predictor"] = pred_vars["params"]
    batch_stats["predictor"] = pred_vars["batch_stats"]
  target = None
  if parts.method.uses_target:
    target = {"params": enc_vars["params"], "batch_stats": enc_vars["batch_stats"]}
  probe_params = nn.Dense(parts.num_classes).init(k_probe, jnp.zeros(features.shape, jnp.float32))["params"]
  target_opt_state = parts.target_tx.init(target["params"]) if parts.target_tx is not None else None
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=parts.tx.init(params),
      target=target,
      objective_state=parts.method.init_objective_state(proj.shape[-1]),
      probe_params=probe_params,
      probe_opt_state=parts.probe_tx.init(probe_params),
      rng=rng,
      refused_in_a_row=jnp.zeros((), jnp.int32),
      target_opt_state=target_opt_state,
  )


def make_views(parts: StepParts, rng: Array, step: Array, batch: Batch) -> tuple[Array, Array]:
  """Two augmented, normalised views of a uint8 batch (or of vectors); keys from (rng,
  step)."""
  key = jax.random.fold_in(jax.random.fold_in(rng, _AUGMENT_STREAM), step)
  k1, k2 = jax.random.split(key)
  if "vectors" in batch:
    return (augment.augment_vectors(k1, batch["vectors"], parts.view1),
            augment.augment_vectors(k2, batch["vectors"], parts.view2))
  precropped = "views" in batch
  sources = (batch["views"][:, 0], batch["views"][:, 1]) if precropped else (batch["images"], batch["images"])
  views = []
  for k, cfg, images in ((k1, parts.view1, sources[0]), (k2, parts.view2, sources[1])):
    x = augment.augment_batch(k, images, cfg, parts.image_size, crop=not precropped)
    views.append(augment.normalize(x, parts.mean, parts.std))
  return views[0], views[1]


def _apply(module, params, stats, x, dropout_key=None):
  """A train-mode forward returning (output, updated batch statistics); ``dropout_key``
  feeds a ViT's stochastic depth (None: none, as for the target branch)."""
  rngs = {} if dropout_key is None else {"dropout": dropout_key}
  out, updates = module.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"],
                              rngs=rngs)
  return out, updates["batch_stats"]


def _apply_views(module, views_module, params, stats, x1, x2, dropout_key=None):
  """((output of view 1, output of view 2), updated batch statistics): two train-mode
  forwards of ``module``, or, with ``views_module`` (its grouped-BatchNorm copy), one
  forward of the views interleaved row by row, which computes the same (each view
  normalised by its own statistics, the running averages updated by view 1, then 2).
  Interleaving keeps each device's rows on that device."""
  if views_module is None:
    keys = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    out1, stats = _apply(module, params, stats, x1, keys[0])
    out2, stats = _apply(module, params, stats, x2, keys[1])
    return (out1, out2), stats
  n = x1.shape[0]
  both = jnp.stack([x1, x2], axis=1).reshape((2 * n,) + x1.shape[1:])
  out, stats = _apply(views_module, params, stats, both, dropout_key)
  paired = jax.tree.map(lambda y: y.reshape((n, 2) + y.shape[1:]), out)
  return (jax.tree.map(lambda y: y[:, 0], paired), jax.tree.map(lambda y: y[:, 1], paired)), stats


def _whole(tree):
  """``tree`` whole on every device for the forward and backward, inside a program
  compiled under a mesh (``jax.set_mesh``, as ``train.lower_train_step`` does); elsewhere
  unchanged.

  Under ``sharding.params=fsdp`` each device keeps a slice of the params, their optimiser
  moments and the EMA target; gathering the params where the step uses them keeps the
  compute data-parallel. Left to itself, the compiler followed the weights' split into the
  activations: ViT-L/16 on a v5litepod-8 all-gathered 18.6 GiB and all-reduced 10.3 GiB
  per chip per step (python -m emim.aot). The gradient is left free (``_gathered``'s
  backward), so it comes back in the params' split, a reduce-scatter, not whole.
  Replicated params make this a no-op."""
  mesh = jax.sharding.get_abstract_mesh()
  if tree is None or mesh.empty:
    return tree
  return _gathered(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gathered(tree, whole):
  return jax.lax.with_sharding_constraint(tree, whole)


def _gathered_fwd(tree, whole):
  return _gathered(tree, whole), None


def _gathered_bwd(whole, _, cotangent):
  # jax transposes a sharding constraint into the same constraint on the cotangent, which
  # would all-reduce the gradient whole onto every device; unconstrained, it follows the
  # params' own sharding (the optimiser's update reads it there).
  del whole
  return (cotangent,)


_gathered.defvjp(_gathered_fwd, _gathered_bwd)


def _branches_loss(parts: StepParts, state: TrainState, x1, x2, params, target_params, stop_target: bool = True,
                   target_step: bool = False):
  """The method's loss of the online branch (``params``: encoder and predictor) against
  the target branch (``target_params``, with the state's target batch statistics; with
  ``target_step``, the loss of the target's own step, ``Method.target_loss``), and
  (new online batch statistics, new target batch statistics, objective state, metrics,
  stop-gradient features and projection of view 1)."""
  params, target_params = _whole(params), _whole(target_params)
  # Stochastic depth (a ViT's drop path) in the online encoder only, as DINO's teacher has none.
  dropout_key = jax.random.fold_in(jax.random.fold_in(state.rng, _DROPOUT_STREAM), state.step)
  with jax.named_scope("online"):
    ((f1, z1), (_, z2)), enc_stats = _apply_views(
        parts.encoder, parts.views_encoder, params["encoder"], state.batch_stats["encoder"], x1, x2, dropout_key)
  new_stats = {"encoder": enc_stats}
  pred = target = target_stats = None
  if parts.predictor is not None:
    with jax.named_scope("predictor"):
      pred, new_stats["predictor"] = _apply_views(
          parts.predictor, parts.views_predictor, params["predictor"], state.batch_stats["predictor"], z1, z2)
  if target_params is not None:
    # The target normalises with its own batch statistics (train mode); an EMA target's
    # running averages are an EMA of the online ones (below), a trained one keeps its own.
    with jax.named_scope("target"):
      (t1, t2), target_stats = _apply_views(parts.encoder, parts.views_encoder, target_params,
                                            state.target["batch_stats"], x1, x2)
    target = (t1[1], t2[1])
    if stop_target:
      target = jax.lax.stop_gradient(target)
  loss_fn = parts.method.target_loss if target_step else parts.method.loss
  with jax.named_scope("objective"):
    loss, objective_state, metrics = loss_fn(Views((z1, z2), pred, target), state.objective_state)
  return loss, (new_stats, target_stats, objective_state, metrics, jax.lax.stop_gradient(f1), jax.lax.stop_gradient(z1))


def _update(tx, grads, opt_state, params):
  with jax.named_scope("optimizer"):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, updates


def _norms(grads, updates):
  with jax.named_scope("norms"):
    return optax.tree.norm(grads), optax.tree.norm(updates)


def _online_update(parts, state, x1, x2):
  """The online branch's step, the target fixed (an EMA target's step, and the SDMI
  prototype's E-step): (loss, aux, (gradient norm, update norm), new params, opt state,
  new batch statistics, target, target optimiser state), the same for every mode."""
  target_params = None if state.target is None else state.target["params"]
  (loss, aux), grads = jax.value_and_grad(
      lambda p: _branches_loss(parts, state, x1, x2, p, target_params), has_aux=True)(state.params)
  params, opt_state, updates = _update(parts.tx, grads, state.opt_state, state.params)
  return loss, aux, _norms(grads, updates), params, opt_state, aux[0], state.target, state.target_opt_state


def _target_update(parts, state, x1, x2):
  """The SDMI prototype's M-step: the target branch ascends the method's target objective
  (the same as the online branch's unless the method says otherwise), the online branch
  fixed (its parameters, optimiser state and batch statistics unchanged)."""
  (loss, aux), grads = jax.value_and_grad(
      lambda tp: _branches_loss(parts, state, x1, x2, state.params, tp, stop_target=False, target_step=True),
      has_aux=True)(state.target["params"])
  target_params, target_opt_state, updates = _update(parts.target_tx, grads, state.target_opt_state,
                                                     state.target["params"])
  target = {"params": target_params, "batch_stats": aux[1]}
  return loss, aux, _norms(grads, updates), state.params, state.opt_state, state.batch_stats, target, target_opt_state


def _joint_update(parts, state, x1, x2):
  """Both branches at once, no stop-gradient between them (the SDMI/JMI paper's ablation of the
  alternation: direct joint ascent). Where the method gives the target an objective of its
  own (``Method.target_loss_fn``), each branch takes its objective's gradient at the same
  point, the alternation's two steps made simultaneous."""
  if parts.method.target_loss_fn is None:
    (loss, aux), (grads, target_grads) = jax.value_and_grad(
        lambda p, tp: _branches_loss(parts, state, x1, x2, p, tp, stop_target=False), argnums=(0, 1),
        has_aux=True)(state.params, state.target["params"])
  else:
    (loss, aux), grads = jax.value_and_grad(
        lambda p: _branches_loss(parts, state, x1, x2, p, state.target["params"]), has_aux=True)(state.params)
    (_, target_aux), target_grads = jax.value_and_grad(
        lambda tp: _branches_loss(parts, state, x1, x2, state.params, tp, stop_target=False, target_step=True),
        has_aux=True)(state.target["params"])
    aux = (aux[0], target_aux[1], *aux[2:])  # the target's batch statistics from its own forward
  params, opt_state, updates = _update(parts.tx, grads, state.opt_state, state.params)
  target_params, target_opt_state, target_updates = _update(parts.target_tx, target_grads, state.target_opt_state,
                                                            state.target["params"])
  target = {"params": target_params, "batch_stats": aux[1]}
  return (loss, aux, _norms((grads, target_grads), (updates, target_updates)), params, opt_state, aux[0], target,
          target_opt_state)


def train_step(state: TrainState, batch: Batch, parts: StepParts) -> tuple[TrainState, Metrics]:
  """One optimisation step of the online encoder (and predictor), the target (an EMA, or
  the SDMI prototype's alternating or joint gradient updates) and the online linear
  probe. Pure: bind ``parts`` with functools.partial and jit."""
  # The named scopes (augment, online, predictor, target, objective, optimizer, probe,
  # ema_update, guard, metrics) name the compiled program's instructions, so a profile or
  # python -m emim.aot --breakdown attributes each to its piece of the step.
  with jax.named_scope("augment"):
    x1, x2 = make_views(parts, state.rng, state.step, batch)
  mode = parts.method.target_update if parts.method.uses_target else "ema"
  phase_metrics = {}
  if mode == "alternating":
    # Block-coordinate ascent: alternate_every steps of the online branch (E-step), then
    # as many of the target (M-step). lax.cond runs only the phase's branch.
    phase = (state.step // parts.method.alternate_every) % 2
    outcome = jax.lax.cond(phase == 0, functools.partial(_online_update, parts), functools.partial(_target_update, parts),
                           state, x1, x2)
    phase_metrics["target_phase"] = phase.astype(jnp.float32)  # its interval mean: the share of M-steps
  elif mode == "joint":
    outcome = _joint_update(parts, state, x1, x2)
  else:
    outcome = _online_update(parts, state, x1, x2)
  loss, aux, (grad_norm, update_norm), params, opt_state, new_stats, target, target_opt_state = outcome
  _, _, objective_state, method_metrics, features, z1 = aux

  # Online linear probe on stop-gradient features of the first view.
  def probe_loss(probe_params):
    logits = nn.Dense(parts.num_classes).apply({"params": probe_params}, features)
    labels = batch["labels"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return ce, jnp.mean(jnp.argmax(logits, -1) == labels)

  with jax.named_scope("probe"):
    (probe_ce, probe_acc), probe_grads = jax.value_and_grad(lambda p: probe_loss(_whole(p)), has_aux=True)(
        state.probe_params)
    probe_updates, probe_opt_state = parts.probe_tx.update(probe_grads, state.probe_opt_state, state.probe_params)
    probe_params = optax.apply_updates(state.probe_params, probe_updates)

  momentum = jnp.float32(0.0)
  if target is not None and mode == "ema":
    momentum = parts.momentum_fn(state.step)
    with jax.named_scope("ema_update"):
      target = ema_update(target, {"params": params["encoder"], "batch_stats": new_stats["encoder"]}, momentum)

  proposed = state.replace(
      step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state, target=target,
      objective_state=objective_state, probe_params=probe_params, probe_opt_state=probe_opt_state,
      refused_in_a_row=jnp.zeros_like(state.refused_in_a_row), target_opt_state=target_opt_state)
  # Never train on a non-finite update: keep the old state (the step still advances, so
  # the data order is unchanged) and count it; the loop stops the run after
  # config.train.max_nonfinite_in_a_row refusals in a row. A NaN or inf anywhere in the
  # gradient or the update makes its norm non-finite, so two scalars check every leaf
  # (the norms are logged anyway).
  with jax.named_scope("guard"):
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm) & jnp.isfinite(probe_ce)
    refused = state.replace(step=state.step + 1, refused_in_a_row=state.refused_in_a_row + 1)
    new_state = jax.tree.map(lambda a, b: jnp.where(ok, a, b), proposed, refused)
  with jax.named_scope("metrics"):
    metrics = _step_metrics(parts, state, new_state, loss, method_metrics, momentum, grad_norm, update_norm, probe_ce,
                            probe_acc, z1, phase_metrics, ok)
  return new_state, metrics


def _step_metrics(parts, state, new_state, loss, method_metrics, momentum, grad_norm, update_norm, probe_ce, probe_acc,
                  z1, phase_metrics, ok):
  """The step's logged scalars."""
  return {
      "loss": loss,
      **method_metrics,
      "lr": parts.lr_fn(state.step),
      "target_momentum": momentum,
      "grad_norm": grad_norm,
      "update_norm": update_norm,
      "param_norm": optax.tree.norm(new_state.params),  # the parameters kept (a refused update's are not)
      "probe_loss": probe_ce,
      "probe_acc": probe_acc,
      "embedding_std": O.embedding_std(z1),
      # The effective rank from traces, unless the objective already reports it (EMMI).
      "rank_renyi2": method_metrics["rank_renyi2"] if "rank_renyi2" in method_metrics else O.renyi2_rank(z1),
      **phase_metrics,
      "finite": ok.astype(jnp.float32),
      "refused_in_a_row": new_state.refused_in_a_row.astype(jnp.float32),
  }


# ----------------------------------------------------------------------------------
# Batches gathered on device from a per-epoch permutation.
# ----------------------------------------------------------------------------------
def epoch_permutation(rng: Array, epoch: Array, n: int) -> Array:
  """The order in which epoch ``epoch`` visits a device-resident dataset of n examples."""
  return jax.random.permutation(jax.random.fold_in(jax.random.fold_in(rng, _DATA_STREAM), epoch), n)


def as_rows(array):
  """A dataset array as the devices hold it: one row per example, (N, H * W * C) for
  images. On a TPU the layout of a (N, H, W, C) uint8 array puts the examples in the
  minor dimension, so gathering a batch from it copied the whole set to another layout
  every step (CIFAR-10 on a v5e: 0.58 GiB of temporaries and 1 GB of memory traffic per
  step, python -m emim.aot); the rows of a 2-D array are gathered where they lie."""
  return array.reshape(array.shape[0], -1)


def as_examples(batch: Batch, example_shape: tuple[int, ...]) -> Batch:
  """A batch gathered from rows (``as_rows``) with its inputs in their example shape."""
  return {k: v if k == "labels" else v.reshape(v.shape[:1] + tuple(example_shape)) for k, v in batch.items()}


def take_batch(dataset: Batch, perm: Array, offset: Array, batch_size: int, batch_sharding) -> Batch:
  """Batch number ``offset`` of an epoch visiting ``dataset`` in the order ``perm``."""
  idx = jax.lax.dynamic_slice(perm, (offset * batch_size,), (batch_size,))
  batch = {k: jnp.take(v, idx, axis=0) for k, v in dataset.items()}
  return jax.lax.with_sharding_constraint(batch, batch_sharding)


def gather_batch(dataset: Batch, rng: Array, step: Array, batch_size: int, batch_sharding) -> Batch:
  """The step's batch from a device-resident dataset, in a per-epoch random order.

  Epoch e visits a permutation drawn from fold_in(data key, e); the last partial batch
  of each epoch is dropped. The host does no per-step work.
  """
  n = dataset["labels"].shape[0]
  steps_per_epoch = n // batch_size
  epoch, offset = step // steps_per_epoch, step % steps_per_epoch
  return take_batch(dataset, epoch_permutation(rng, epoch, n), offset, batch_size, batch_sharding)


def device_data_step(state: TrainState, dataset: Batch, parts: StepParts, batch_size: int, batch_sharding):
  """gather_batch then train_step, as one jitted program; ``dataset`` held as rows
  (``as_rows``) or in its example shape."""
  batch = as_examples(gather_batch(dataset, state.rng, state.step, batch_size, batch_sharding), parts.input_shape)
  return train_step(state, batch, parts)
