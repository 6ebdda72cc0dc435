"""The embedded default's data: a labelled Gaussian mixture of images, made in memory."""

from __future__ import annotations

import numpy as np

from emim.data.dataset import ImageDataset


def synthetic(num_examples: int, image_size: int, num_classes: int, seed: int, noise: float = 0.1) -> ImageDataset:
  """A labelled Gaussian mixture of images.

  Each image is its class's prototype (a fixed smooth random pattern) plus an
  instance-specific smooth Gaussian pattern plus pixel noise. The smooth instance part
  survives crops and colour jitter, so two views of one image share information an
  encoder can learn to keep (instance discrimination), and the class part gives the
  probe something to find. The prototypes are fixed; ``seed`` draws the labels and the
  rest, so train and test splits (different seeds) share their classes.
  """

  def smooth(rng, count, cells):
    coarse = rng.normal(size=(count, cells, cells, 3))
    reps = -(-image_size // cells)
    return np.kron(coarse, np.ones((1, reps, reps, 1)))[:, :image_size, :image_size]

  prototypes = 0.5 + 0.15 * smooth(np.random.default_rng(1234), num_classes, 4)
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, size=num_examples).astype(np.int32)
  instance = 0.25 * smooth(rng, num_examples, 4)
  images = prototypes[labels] + instance + noise * rng.normal(size=(num_examples, image_size, image_size, 3))
  images = np.clip(np.round(images * 255), 0, 255).astype(np.uint8)
  return ImageDataset(images, labels, tuple(f"class_{i}" for i in range(num_classes)))
