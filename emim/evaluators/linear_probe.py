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

import functools
import logging
import time

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from emim import sharding
from emim.backbone import Backbone, extract_features
from emim.data import augment
from emim.data.sources import ImageDataset
from emim.train_step import gather_batch

MODES = ("augmented", "features")


@flax.struct.dataclass
class ProbeState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  rng: jax.Array


def _classifier(params, features):
  return features @ params["kernel"] + params["bias"]


def _train_augment(backbone: Backbone, key, images):
  """The probe's training crops: pad-and-crop + flip for CIFAR-sized images, random
  resized crop + flip otherwise."""
  images = augment.to_float(images)
  keys = jax.random.split(key, images.shape[0])
  size = backbone.image_size
  if images.shape[1] <= 64:
    fn = lambda k, x: augment.random_flip(k, augment.pad_and_random_crop(jax.random.fold_in(k, 1), x, 4))
  else:
    fn = lambda k, x: augment.random_flip(k, augment.random_resized_crop(jax.random.fold_in(k, 1), x, size))
  return jax.vmap(fn)(keys, images)


def topk_accuracy(logits, labels, k: int) -> float:
  top = np.argsort(-logits, axis=1)[:, :k]
  return float(np.mean(np.any(top == labels[:, None], axis=1)))


def linear_probe(backbone: Backbone, train: ImageDataset, test: ImageDataset, cfg: ml_collections.ConfigDict,
                 mode: str = "augmented", seed: int = 0, mesh=None) -> dict[str, float]:
  """Train the probe and report {"linear_top1", "linear_top5", "linear_train_s"}.

  cfg fields: probe_epochs, probe_lr (per 256 examples), probe_batch_size,
  probe_weight_decay, batch_size (feature extraction).
  """
  if mode not in MODES:
    raise ValueError(f"Unknown linear-probe mode {mode!r}; choose one of {MODES}.")
  mesh = mesh or sharding.make_mesh()
  replicated, batch_spec = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  batch_size = min(cfg.probe_batch_size, len(train))
  batch_size -= batch_size % mesh.devices.size
  sharding.check_batch_size(batch_size, mesh)
  steps_per_epoch = len(train) // batch_size
  total_steps = cfg.probe_epochs * steps_per_epoch
  features_fn = backbone.features_fn()
  t0 = time.perf_counter()

  if mode == "features":
    inputs = extract_features(features_fn, train.images, cfg.batch_size, mesh)
    to_features = lambda variables, key, x: x
  else:
    inputs = train.images
    to_features = lambda variables, key, x: backbone.model.apply(
        variables, augment.normalize(_train_augment(backbone, key, x), backbone.mean, backbone.std), train=False)
  data = {"inputs": sharding.put_global(inputs, replicated), "labels": sharding.put_global(train.labels, replicated)}

  schedule = optax.cosine_decay_schedule(cfg.probe_lr * batch_size / 256.0, max(total_steps, 1))
  tx = optax.chain(optax.add_decayed_weights(cfg.probe_weight_decay), optax.sgd(schedule, momentum=0.9))
  params = {"kernel": jnp.zeros((backbone.feature_dim, train.num_classes)), "bias": jnp.zeros((train.num_classes,))}
  state = ProbeState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(seed))

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state: ProbeState, data, variables):
    batch = gather_batch(data, state.rng, state.step, batch_size, batch_spec)
    key = jax.random.fold_in(state.rng, state.step)
    features = jax.lax.stop_gradient(to_features(variables, key, batch["inputs"]))

    def loss_fn(params):
      logits = _classifier(params, features)
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state), loss

  variables = jax.device_put(backbone.variables, replicated)
  loss = jnp.nan
  for i in range(total_steps):
    state, loss = step(state, data, variables)
    if (i + 1) % max(steps_per_epoch * max(cfg.probe_epochs // 5, 1), 1) == 0:
      logging.info("linear probe: epoch %d/%d, loss %.4f", (i + 1) // steps_per_epoch, cfg.probe_epochs, float(loss))
  if not np.isfinite(float(loss)):
    raise FloatingPointError(f"The linear probe's loss is {float(loss)}: lower --config.eval.probe_lr.")
  train_s = time.perf_counter() - t0
  test_features = extract_features(features_fn, test.images, cfg.batch_size, mesh)
  logits = np.asarray(_classifier(jax.device_get(state.params), test_features))
  return {
      "linear_top1": topk_accuracy(logits, test.labels, 1),
      "linear_top5": topk_accuracy(logits, test.labels, min(5, train.num_classes)),
      "linear_train_s": train_s,
  }
