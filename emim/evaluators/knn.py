"""Weighted k-nearest-neighbour classification on cosine similarity (Wu et al. 2018).

Each of the k nearest training features votes for its label with weight
exp(cos / temperature); the prediction is the class with the largest total.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from emim import models
from emim.backbone import backbone_from_model_config, extract_features, model_config_of
from emim.data.dataset import DatasetError
from emim.evaluators import Context, register
from emim.objectives import l2_normalize
from emim.objectives.precision import float32_products


@functools.partial(jax.jit, static_argnames=("ks", "num_classes"))
@float32_products  # the similarities decide the neighbours (emim/objectives/precision.py)
def _knn_chunk(train_feats, train_onehot, test_feats, test_labels, ks, num_classes, temperature):
  sims = test_feats @ train_feats.T
  top_sims, top_idx = jax.lax.top_k(sims, max(ks))
  weights = jnp.exp(top_sims / temperature)
  votes_each = train_onehot[top_idx] * weights[..., None]  # (chunk, kmax, classes)
  correct = {}
  for k in ks:
    prediction = jnp.argmax(jnp.sum(votes_each[:, :k], axis=1), axis=-1)
    correct[k] = jnp.sum(prediction == test_labels)
  return correct


def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes: int,
                 ks=(20, 200), temperature: float = 0.07, chunk: int = 256) -> dict[str, float]:
  """Top-1 accuracy of the weighted kNN classifier for each k, as {"knn_top1_k20": ...}."""
  ks = tuple(sorted({min(int(k), len(train_labels)) for k in ks}))
  train = l2_normalize(jnp.asarray(train_features))
  onehot = jax.nn.one_hot(jnp.asarray(train_labels), num_classes)
  test = np.asarray(test_features)
  labels = np.asarray(test_labels)
  correct = {k: 0 for k in ks}
  for start in range(0, len(test), chunk):
    part = _knn_chunk(train, onehot, l2_normalize(jnp.asarray(test[start : start + chunk])),
                      jnp.asarray(labels[start : start + chunk]), ks, num_classes, temperature)
    for k in ks:
      correct[k] += int(part[k])
  return {f"knn_top1_k{k}": correct[k] / len(test) for k in ks}


class PeriodicKnn:
  """kNN accuracy of the online backbone on fixed (small) train and test sets, cheap
  enough to run inside training every ``config.eval.every_steps`` steps."""

  name, at_start = "knn", False

  def __init__(self, backbone, train_data, test_data, eval_cfg, mesh):
    self.every_steps = eval_cfg.every_steps
    self._train = (train_data.inputs, train_data.labels)
    self._test = (test_data.inputs, test_data.labels)
    self._num_classes = train_data.num_classes
    self._cfg = eval_cfg
    self._mesh = mesh
    self._apply = backbone.jitted_apply()

  def accuracy(self, variables) -> dict[str, float]:
    """kNN accuracy of the backbone with ``variables`` on the fixed subsets."""
    fn = lambda images: self._apply(variables, images)
    size = self._cfg.batch_size
    train_f = extract_features(fn, self._train[0], size, self._mesh)
    test_f = extract_features(fn, self._test[0], size, self._mesh)
    return knn_accuracy(train_f, self._train[1], test_f, self._test[1], self._num_classes,
                        tuple(self._cfg.knn_k), self._cfg.knn_temperature)

  def run(self, state) -> dict[str, float]:
    variables = models.backbone_variables(state.params["encoder"], state.batch_stats["encoder"])
    return {f"knn/{k}": v for k, v in self.accuracy(variables).items()}


@register("knn")
def build(config: ml_collections.ConfigDict, context: Context) -> PeriodicKnn | None:
  if config.eval.every_steps <= 0:
    return None
  data = context.data
  try:
    test = data.test_subset(config.eval.knn_test_subset)
  except DatasetError as e:
    raise DatasetError(f"{e} The periodic kNN (--config.eval.every_steps={config.eval.every_steps}) needs the test "
                       "split; set --config.eval.every_steps=0 to train without it.") from e
  backbone = backbone_from_model_config(model_config_of(config), {})
  return PeriodicKnn(backbone, data.train_subset(config.eval.knn_train_subset), test, config.eval, context.mesh)
