"""TFDS datasets: read as ArrayRecord with ``tfds.data_source`` (random access, no
TensorFlow), or any prepared format through ``tfds.load`` where TensorFlow is installed;
in memory (``tfds_source``) or as records for the streaming pipeline
(``tfds_stream_records``), with a class subset's records indexed once."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
import os
import pathlib

import numpy as np
from PIL import Image

from emim.data.dataset import DatasetError, ImageDataset
from emim.data.image_folder import decode_image


def tfds_examples(name: str, split: str, data_dir: str | None):
  """(examples, number of examples) of a prepared TFDS split.

  ArrayRecord is read with ``tfds.data_source`` (random access, no TensorFlow). Any other
  prepared format (``tfds.load``'s default TFRecord) is read with ``tfds.load`` when
  TensorFlow is installed.
  """
  import tensorflow_datasets as tfds  # imported here: only this source needs it

  where = data_dir or "~/tensorflow_datasets"
  prepare = (f"Prepare it where TensorFlow and the internet are available (pip install -e .[tf]; "
             f"tfds build {name} --file_format=array_record) and set config.data.tfds_data_dir")
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    return (source[i] for i in range(len(source))), len(source)
  except Exception as e:
    if importlib.util.find_spec("tensorflow") is None:
      raise DatasetError(
          f"TFDS dataset {name!r} split {split!r} is not prepared as ArrayRecord in {where} ({e}). {prepare}; "
          "or, for a dataset prepared in another format, install TensorFlow (pip install -e .[tf]) so that "
          "tfds.load reads it.") from e
    logging.info("tfds.data_source cannot read %s (%s); reading it with tfds.load.", name, e)
  try:
    dataset = tfds.load(name, split=split, data_dir=data_dir or None, download=False)
    return tfds.as_numpy(dataset), len(dataset)
  except Exception as e:
    raise DatasetError(f"TFDS dataset {name!r} split {split!r} is not prepared in {where} ({e}). {prepare}.") from e


def tfds_class_names(name: str, data_dir: str | None) -> tuple[str, ...] | None:
  """The label names of a prepared TFDS dataset, from its ``DatasetInfo`` (None when it
  has no ``label`` feature with names)."""
  import tensorflow_datasets as tfds

  try:
    features = tfds.builder(name, data_dir=data_dir or None).info.features
  except Exception as e:  # reported where the data is read
    logging.info("No DatasetInfo for TFDS %s (%s).", name, e)
    return None
  label = features["label"] if "label" in features else None
  names = getattr(label, "names", None)
  return tuple(names) if names else None


def tfds_source(name: str, split: str, data_dir: str | None, image_size: int | None,
                subset: tuple[str, ...] | None = None) -> ImageDataset:
  examples, count = tfds_examples(name, split, data_dir)
  logging.info("Reading %d examples of TFDS %s/%s.", count, name, split)
  all_names = tfds_class_names(name, data_dir)
  relabel = _subset_relabel(all_names, subset, name)
  images, labels = [], []
  for i, example in enumerate(examples):
    label = int(example["label"])
    if relabel is not None:
      if relabel[label] < 0:
        continue
      label = int(relabel[label])
    image = _rgb(np.asarray(example["image"], np.uint8))
    if image_size is not None and image.shape[:2] != (image_size, image_size):
      image = decode_image((f"{name}[{i}]", _png_bytes(image)), image_size)
    images.append(image)
    labels.append(label)
  if not labels:
    raise DatasetError(f"TFDS {name}/{split} has no example of the classes of --config.data.class_subset.")
  names = subset or all_names or tuple(str(i) for i in range(int(max(labels)) + 1))
  if max(labels) >= len(names):
    raise DatasetError(f"TFDS {name}/{split} has label {max(labels)}, but its DatasetInfo names {len(names)} classes.")
  return ImageDataset(np.stack(images), np.array(labels, np.int32), tuple(names))


def _subset_relabel(all_names, subset, name: str) -> np.ndarray | None:
  """For each of the dataset's labels, its label among ``subset`` (-1: not in it)."""
  if subset is None:
    return None
  if not all_names:
    raise DatasetError(f"--config.data.class_subset needs the class names of TFDS {name!r}, and its DatasetInfo has "
                       "none: prepare the dataset with its metadata (tfds build), or clear class_subset.")
  missing = sorted(set(subset) - set(all_names))
  if missing:
    raise DatasetError(f"TFDS {name!r} has no class {missing[:5]} of --config.data.class_subset.")
  index = {c: i for i, c in enumerate(subset)}
  return np.array([index.get(c, -1) for c in all_names], np.int64)


class SubsetRecords:
  """The records of a random-access TFDS source whose class is in a subset, their labels
  renumbered among the subset's classes. Which records those are is computed once, by
  reading every record's label (without decoding its image where TFDS allows), and kept
  in ``cache_dir``: the next run starts at once."""

  def __init__(self, source, relabel: np.ndarray, cache_key: str, cache_dir: str):
    self._source, self._relabel = source, relabel
    path = pathlib.Path(cache_dir).expanduser() / f"{cache_key}.npy"
    if path.exists():
      self._indices = np.load(path)
    else:
      logging.info("Finding the records of the class subset among %d (once; kept in %s).", len(source), path)
      labels = np.array([int(source[i]["label"]) for i in range(len(source))], np.int64)
      self._indices = np.flatnonzero(relabel[labels] >= 0)
      try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, self._indices)
        os.replace(tmp, path)
      except OSError as e:
        logging.warning("Cannot keep the subset's record index in %s (%s).", path, e)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i):
    example = dict(self._source[int(self._indices[i])])
    example["label"] = int(self._relabel[int(example["label"])])
    return example


def tfds_stream_records(name: str, split: str, data_dir: str | None, subset: tuple[str, ...] | None):
  """(random-access records, class names) of a TFDS split prepared as ArrayRecord, for
  streaming: images left encoded where TFDS allows (the host workers decode them, JPEGs
  at a reduced scale when the crop allows), only the subset's classes when given."""
  import tensorflow_datasets as tfds

  def open_source(decoders):
    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False, decoders=decoders)

  try:
    source = open_source(None)
  except Exception as e:
    raise DatasetError(
        f"TFDS dataset {name!r} split {split!r} is not prepared as ArrayRecord ({e}). Streaming reads at random, "
        f"which needs ArrayRecord: tfds build {name} --file_format=array_record (see the README's Data section).") from e
  try:  # encoded bytes, decoded by the workers (TFDS's own decoding decodes at full size)
    encoded = open_source({"image": tfds.decode.SkipDecoding()})
    encoded[0]
    source = encoded
  except Exception as e:  # (mock datasets and some versions cannot skip decoding)
    logging.info("TFDS %s is read decoded (%s).", name, e)
  all_names = tfds_class_names(name, data_dir)
  if subset is None:
    return source, all_names
  relabel = _subset_relabel(all_names, subset, name)
  key = hashlib.sha1(f"{name}|{split}|{data_dir}|{len(source)}|{subset}".encode()).hexdigest()[:16]
  safe = "".join(ch if ch.isalnum() else "_" for ch in f"{name}_{split}")[:60]
  return SubsetRecords(source, relabel, f"{safe}-{key}", "~/.cache/emim/tfds_subsets"), subset


def _rgb(image: np.ndarray) -> np.ndarray:
  """(H, W, 1) or (H, W) grayscale -> (H, W, 3); RGB unchanged."""
  if image.ndim == 2:
    image = image[..., None]
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def _png_bytes(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(array, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()
