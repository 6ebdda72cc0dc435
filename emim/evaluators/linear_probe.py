"""The linear probe: a linear classifier on frozen backbone features, trained with SGD
and cross-entropy, evaluated by top-1/top-5 on the test split.

Two modes:
  * "augmented" (the standard protocol): every step draws a batch of training images,
    augments it on device (CIFAR: pad-4 random crop and flip; larger images: random
    resized crop and flip) and runs the frozen backbone on it;
  * "features" (a quick check): centre features computed once, the classifier trained
    on them.
Test features are always centre features. Deterministic in the seed.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from emim import compiled, sharding
from emim.backbone import Backbone, features_and_labels
from emim.data import augment
from emim.train_step import as_examples, as_rows, epoch_permutation, take_batch

MODES = ("augmented", "features")


@flax.struct.dataclass
class ProbeState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  rng: jax.Array


def _classifier(params, features):
  return features @ params["kernel"] + params["bias"]


def _train_augment(backbone: Backbone, key, images, precropped: bool = False):
  """The probe's training crops: pad-and-crop + flip for CIFAR-sized images, random
  resized crop + flip otherwise; a flip alone for streamed images, whose random resized
  crop the host took from the full image (``precropped``)."""
  images = augment.to_float(images)
  keys = jax.random.split(key, images.shape[0])
  size = backbone.image_size
  if precropped:
    fn = augment.random_flip
  elif images.shape[1] <= 64:
    fn = lambda k, x: augment.random_flip(k, augment.pad_and_random_crop(jax.random.fold_in(k, 1), x, 4))
  else:
    fn = lambda k, x: augment.random_flip(k, augment.random_resized_crop(jax.random.fold_in(k, 1), x, size))
  return jax.vmap(fn)(keys, images)


def topk_accuracy(logits, labels, k: int) -> float:
  top = np.argsort(-logits, axis=1)[:, :k]
  return float(np.mean(np.any(top == labels[:, None], axis=1)))


def probe_optimizer(cfg: ml_collections.ConfigDict, batch_size: int, total_steps: int) -> optax.GradientTransformation:
  """The probe's optimiser (``cfg``: the config's eval fields), its rate scaled by the batch."""
  schedule = optax.cosine_decay_schedule(cfg.probe_lr * batch_size / 256.0, max(total_steps, 1))
  if cfg.probe_optimizer == "lars":
    return optax.lars(schedule, weight_decay=cfg.probe_weight_decay, momentum=0.9)
  if cfg.probe_optimizer == "sgd":
    return optax.chain(optax.add_decayed_weights(cfg.probe_weight_decay), optax.sgd(schedule, momentum=0.9))
  raise ValueError(f"Unknown probe optimizer {cfg.probe_optimizer!r}; choose 'sgd' or 'lars'.")


def probe_batch_size(cfg: ml_collections.ConfigDict, num_examples: int, mesh) -> int:
  """The probe's global batch: ``cfg.probe_batch_size`` (at most the training set),
  rounded down to a multiple of the devices."""
  batch_size = min(cfg.probe_batch_size, num_examples)
  batch_size -= batch_size % mesh.devices.size
  sharding.check_batch_size(batch_size, mesh)
  return batch_size


def init_probe_state(backbone: Backbone, num_classes: int, tx: optax.GradientTransformation, seed: int) -> ProbeState:
  """The probe's zero-initialised classifier and its optimiser state."""
  params = {"kernel": jnp.zeros((backbone.feature_dim, num_classes)), "bias": jnp.zeros((num_classes,))}
  return ProbeState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(seed))


def probe_step_fn(backbone: Backbone, tx: optax.GradientTransformation, mode: str, precropped: bool):
  """The probe's step ``(state, {"inputs", "labels"}, backbone variables) -> (state,
  loss)``: in the "augmented" mode the inputs are uint8 images, augmented (a flip alone
  when ``precropped``: streamed crops) and passed through the frozen backbone; in the
  "features" mode they are the features."""
  if mode == "features":
    to_features = lambda variables, key, x: x
  else:
    to_features = lambda variables, key, x: backbone.model.apply(
        variables, augment.normalize(_train_augment(backbone, key, x, precropped=precropped), backbone.mean,
                                     backbone.std), train=False)

  def train_step(state: ProbeState, batch, variables):
    key = jax.random.fold_in(state.rng, state.step)
    features = jax.lax.stop_gradient(to_features(variables, key, batch["inputs"]))

    def loss_fn(params):
      logits = _classifier(params, features)
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state), loss

  return train_step


def probe_epoch_fn(train_step, num_examples: int, batch_size: int, batch_spec, example_shape: tuple[int, ...]):
  """An epoch of ``train_step`` over a device-held set ``{"inputs", "labels"}`` (the
  inputs as rows, ``as_rows``, of ``example_shape``):
  ``(state, data, variables) -> (state, the last step's loss)``. One permutation per
  epoch and the epoch's steps in a scan, in the training data's order: on precomputed
  features a step is one small matrix product, and a permutation and a dispatch per step
  would cost far more than the step."""
  steps_per_epoch = num_examples // batch_size

  def train_epoch(state: ProbeState, data, variables):
    perm = epoch_permutation(state.rng, state.step // steps_per_epoch, num_examples)

    def body(state, offset):
      return train_step(state, as_examples(take_batch(data, perm, offset, batch_size, batch_spec), example_shape),
                        variables)

    state, losses = jax.lax.scan(body, state, jnp.arange(steps_per_epoch))
    return state, losses[-1]

  return train_epoch


def linear_probe(backbone: Backbone, train, test, cfg: ml_collections.ConfigDict,
                 mode: str = "augmented", seed: int = 0, mesh=None, workers: int = 0,
                 features: tuple | None = None) -> dict[str, float]:
  """Train the probe and report {"linear_top1", "linear_top5", "linear_train_s"}.

  Args:
    backbone: the frozen backbone.
    train, test: in-memory ``ImageDataset``s, or ``streaming.StreamSplit``s for data
      decoded on the host batch by batch (ImageNet: the "augmented" mode's training
      crops are random resized crops of the full images, taken by the host workers,
      sharded over the processes like training's, then flipped on the device).
    cfg: probe_epochs, probe_optimizer ("sgd" or "lars"), probe_lr (per 256 examples),
      probe_batch_size, probe_weight_decay, batch_size (feature extraction).
    mode: "augmented" or "features".
    workers: host decoding processes for streamed splits.
    features: ((train features, labels), (test features, labels)) of centre views when
      already computed (the evaluation program's kNN has them): the "features" mode
      trains on the first, and both modes test on the second, without extracting again.
  """
  if mode not in MODES:
    raise ValueError(f"Unknown linear-probe mode {mode!r}; choose one of {MODES}.")
  mesh = mesh or sharding.make_mesh()
  replicated, batch_spec = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  batch_size = probe_batch_size(cfg, len(train), mesh)
  steps_per_epoch = len(train) // batch_size
  total_steps = cfg.probe_epochs * steps_per_epoch
  features_fn = backbone.features_fn()
  t0 = time.perf_counter()

  in_memory = mode == "features" or hasattr(train, "inputs")
  if mode == "features":
    inputs, labels = features[0] if features else features_and_labels(features_fn, train, cfg.batch_size, mesh, workers)
  else:
    inputs, labels = (train.inputs, train.labels) if in_memory else (None, None)

  tx = probe_optimizer(cfg, batch_size, total_steps)
  num_classes = train.num_classes
  state = init_probe_state(backbone, num_classes, tx, seed)
  train_step = probe_step_fn(backbone, tx, mode, precropped=not in_memory)

  variables = jax.device_put(backbone.variables, replicated)
  log_every_epochs = max(cfg.probe_epochs // 5, 1)
  loss = jnp.nan
  if inputs is not None:  # on the devices: a whole epoch is one program
    data = {"inputs": sharding.put_global(as_rows(inputs), replicated), "labels": sharding.put_global(labels, replicated)}
    # Compiled once per process for this model, probe config and data shape (an
    # evaluation re-run, or of another checkpoint of the run, reuses it); the program holds
    # a variable-free copy of the backbone, its variables an argument.
    key = compiled.key_of(backbone.model_config, cfg.to_json_best_effort(sort_keys=True), mode, len(labels),
                          batch_size, inputs.shape[1:], str(inputs.dtype), num_classes, [d.id for d in mesh.devices.flat])
    model_only = dataclasses.replace(backbone, variables={})
    train_epoch = compiled.once("probe_epoch", key, lambda: jax.jit(probe_epoch_fn(
        probe_step_fn(model_only, tx, mode, precropped=False), len(labels), batch_size, batch_spec, inputs.shape[1:]),
        donate_argnums=0))
    for epoch in range(1, cfg.probe_epochs + 1):
      state, loss = train_epoch(state, data, variables)
      if epoch % log_every_epochs == 0:
        logging.info("linear probe: epoch %d/%d, loss %.4f", epoch, cfg.probe_epochs, float(loss))
  else:  # streamed: host workers decode, the device augments, a step at a time
    stream = train.shuffled_batches(batch_size, seed, workers)
    step = jax.jit(train_step, donate_argnums=0)
    for i in range(total_steps):
      local = next(stream)
      batch = sharding.global_batch({"inputs": local["images"], "labels": local["labels"]}, batch_spec)
      state, loss = step(state, batch, variables)
      if (i + 1) % (steps_per_epoch * log_every_epochs) == 0:
        logging.info("linear probe: epoch %d/%d, loss %.4f", (i + 1) // steps_per_epoch, cfg.probe_epochs, float(loss))
  if not np.isfinite(float(loss)):
    raise FloatingPointError(f"The linear probe's loss is {float(loss)}: lower --config.eval.probe_lr.")
  train_s = time.perf_counter() - t0
  test_features, test_labels = features[1] if features else features_and_labels(features_fn, test, cfg.batch_size, mesh, workers)
  logits = np.asarray(_classifier(jax.device_get(state.params), test_features))
  return {
      "linear_top1": topk_accuracy(logits, test_labels, 1),
      "linear_top5": topk_accuracy(logits, test_labels, min(5, num_classes)),
      "linear_train_s": train_s,
  }
