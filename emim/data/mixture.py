"""A labelled Gaussian mixture of vectors, and the exact MI of its two views.

The SDMI/JMI paper's first experiment tracks MI estimates on a Gaussian mixture. Here a point is
its cluster's mean plus an instance part, x = mu_k + s, s ~ N(0, instance_std^2 I), in
R^dim; a view adds fresh noise, v = x + n, n ~ N(0, noise_std^2 I), and may zero each
coordinate with probability mask_p (emim/data/augment.py, ``augment_vectors``). The views
of one point share its cluster and its instance part: that is the information an
encoder can keep.

Without masking every density is a mixture of Gaussians known in closed form, so the MI
between the two views of the generative distribution, I(v1; v2) = E log p(v1, v2) /
(p(v1) p(v2)), is a Monte Carlo average of exact log-densities: the ceiling every
estimate of the embeddings' MI sits under (data processing).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy.special import logsumexp

from emim.config_base import ConfigError

_MEANS_SEED = 1234  # the cluster means are fixed: train and test splits share them


@dataclasses.dataclass(frozen=True)
class VectorDataset:
  """float32 vectors (N, dim), int32 labels (N,) and the class names."""

  vectors: np.ndarray
  labels: np.ndarray
  class_names: tuple[str, ...]

  input_key = "vectors"  # the key of the inputs in a batch

  @property
  def inputs(self) -> np.ndarray:
    return self.vectors

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return len(self.labels)


def cluster_means(num_classes: int, dim: int, separation: float) -> np.ndarray:
  """The fixed means mu_k ~ N(0, separation^2 I)."""
  return separation * np.random.default_rng(_MEANS_SEED).normal(size=(num_classes, dim))


def gaussian_mixture(num_examples: int, dim: int, num_classes: int, separation: float, instance_std: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(vectors (N, dim) float32, labels (N,) int32) of equally likely clusters."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, size=num_examples).astype(np.int32)
  means = cluster_means(num_classes, dim, separation)
  vectors = means[labels] + instance_std * rng.normal(size=(num_examples, dim))
  return vectors.astype(np.float32), labels


def views_mutual_information(num_classes: int, dim: int, separation: float, instance_std: float,
                             noise_std: tuple[float, float], samples: int = 100_000, seed: int = 0) -> tuple[float, float]:
  """I(v1; v2) in nats for v_i = mu_k + s + n_i, n_i ~ N(0, noise_std[i]^2 I), and the
  Monte Carlo standard error.

  Given the cluster, each coordinate of (v1, v2) is a bivariate Gaussian around
  (mu_k, mu_k) with variances a_i = instance_std^2 + noise_std[i]^2 and covariance
  b = instance_std^2, so log p(v1, v2) and log p(v_i) are log-sum-exps over the clusters
  of closed forms; the expectation is over exact samples.
  """
  if min(noise_std) <= 0:
    raise ConfigError("--config.augment.view1.noise_std and view2.noise_std must both be positive: a view without "
                      "noise determines the instance, and the MI of a continuous distribution with it is infinite.")
  rng = np.random.default_rng(seed)
  means = cluster_means(num_classes, dim, separation)
  a1, a2, b = instance_std**2 + noise_std[0] ** 2, instance_std**2 + noise_std[1] ** 2, instance_std**2
  det = a1 * a2 - b * b
  log_prior = -math.log(num_classes)

  def log_marginal(u, a):
    return logsumexp(log_prior - 0.5 * dim * math.log(2 * math.pi * a) - 0.5 * (u**2).sum(-1) / a, axis=1)

  totals = []
  for start in range(0, samples, 20_000):
    m = min(20_000, samples - start)
    k = rng.integers(0, num_classes, size=m)
    x = means[k] + instance_std * rng.normal(size=(m, dim))
    u1 = (x + noise_std[0] * rng.normal(size=(m, dim)))[:, None, :] - means[None]  # (m, K, dim)
    u2 = (x + noise_std[1] * rng.normal(size=(m, dim)))[:, None, :] - means[None]
    quad = ((a2 * u1**2 - 2 * b * u1 * u2 + a1 * u2**2) / det).sum(-1)
    log_joint = logsumexp(log_prior - dim * math.log(2 * math.pi) - 0.5 * dim * math.log(det) - 0.5 * quad, axis=1)
    totals.append(log_joint - log_marginal(u1, a1) - log_marginal(u2, a2))
  pointwise = np.concatenate(totals)
  return float(pointwise.mean()), float(pointwise.std() / math.sqrt(len(pointwise)))
