"""Where the data comes from: ``load(config.data, split)`` names the source.

Images: a synthetic mixture (``synthetic.py``), an image folder decoded once into a cache
(``image_folder.py``) or a TFDS dataset (``tfds_source.py``), each an ``ImageDataset``
(``dataset.py``) of uint8 images in memory, its classes chosen and numbered by
``labels.py``. Vectors: a Gaussian mixture in R^d (``mixture.py``). The names those
modules define are also importable from here.
"""

from __future__ import annotations

import logging
import os

import ml_collections

from emim.config_base import VECTOR_SOURCES, ConfigError
from emim.data import mixture
from emim.data.dataset import DatasetError, ImageDataset
from emim.data.image_folder import IMAGE_SUFFIXES, decode_image, directory_classes, folder_class_names, image_folder
from emim.data.labels import class_subset, label_index, split_is_train
from emim.data.prepare import check_image_folder
from emim.data.synthetic import synthetic
from emim.data.tfds_source import SubsetRecords, tfds_class_names, tfds_examples, tfds_source, tfds_stream_records

__all__ = [
    "IMAGE_SUFFIXES", "SOURCES", "DatasetError", "ImageDataset", "SubsetRecords", "class_subset", "decode_image",
    "directory_classes", "folder_class_names", "image_folder", "input_shape", "known_views_mi", "label_index", "load",
    "split_is_train", "synthetic", "tfds_class_names", "tfds_examples", "tfds_source", "tfds_stream_records",
]


SOURCES = ("synthetic", "image_folder", "tfds", "gaussian_mixture")


def input_shape(data_cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The shape of one example as the encoder sees it."""
  if data_cfg.source in VECTOR_SOURCES:
    return (data_cfg.dim,)
  return (data_cfg.image_size, data_cfg.image_size, 3)


def known_views_mi(config: ml_collections.ConfigDict) -> float | None:
  """The exact MI between two views of the data's distribution where it is known in
  closed form: the Gaussian mixture with noise views and no masking. None elsewhere."""
  d, views = config.data, (config.augment.view1, config.augment.view2)
  if d.source != "gaussian_mixture" or any(v.mask_p > 0 for v in views):
    return None
  mi, stderr = mixture.views_mutual_information(d.num_classes, d.dim, d.separation, d.instance_std,
                                               (views[0].noise_std, views[1].noise_std))
  logging.info("The exact MI of two views of the Gaussian mixture: %.3f nats (Monte Carlo standard error %.3f).", mi, stderr)
  return mi


def load(data_cfg: ml_collections.ConfigDict, split: str, cache_dir: str | None = None,
         train_classes: tuple[str, ...] | None = None) -> ImageDataset | mixture.VectorDataset:
  """The dataset named by ``config.data`` for one split ("train" or "test"), labelled by
  the training split's classes (``train_classes`` when known, else listed)."""
  if data_cfg.source == "gaussian_mixture":
    n = data_cfg.num_train if split == "train" else data_cfg.num_test
    vectors, labels = mixture.gaussian_mixture(n, data_cfg.dim, data_cfg.num_classes, data_cfg.separation,
                                               data_cfg.instance_std, seed=0 if split == "train" else 1)
    return mixture.VectorDataset(vectors, labels, tuple(f"cluster_{i}" for i in range(data_cfg.num_classes)))
  if data_cfg.source == "synthetic":
    n = data_cfg.num_train if split == "train" else data_cfg.num_test
    return synthetic(n, data_cfg.image_size, data_cfg.num_classes, seed=0 if split == "train" else 1)
  if data_cfg.source == "image_folder":
    check_image_folder(data_cfg)  # a missing folder: the command that prepares it
    size, subset = data_cfg.decode_size or None, class_subset(data_cfg)
    # Decoded into memory by at most config.data.workers processes, no more than the
    # cores this process may use (0 or 1: in this process); a data config without the
    # field, one per core.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = cores if data_cfg.get("workers") is None else max(1, min(data_cfg.workers, cores))
    if split == "train":
      return image_folder(data_cfg.path, data_cfg.train_split, size, data_cfg.cache_dir or cache_dir, workers,
                          subset=subset)
    if train_classes is None:
      train_classes = folder_class_names(data_cfg.path, data_cfg.train_split, subset)
    return image_folder(data_cfg.path, data_cfg.test_split, size, data_cfg.cache_dir or cache_dir, workers,
                        train_classes=train_classes, subset=subset)
  if data_cfg.source == "tfds":
    split_name = data_cfg.train_split if split == "train" else data_cfg.test_split
    return tfds_source(data_cfg.tfds_name, split_name, data_cfg.tfds_data_dir, data_cfg.decode_size or None,
                       class_subset(data_cfg))
  raise ConfigError(f"--config.data.source={data_cfg.source!r}: choose one of {', '.join(SOURCES)}.")
