"""Where images come from: a synthetic mixture, an image folder, or a TFDS dataset.

Each source returns an ``ImageDataset`` of uint8 images in memory. The image folder is
decoded once, in parallel, into a uint8 cache so later runs start at once; TFDS is read
with ``tfds.data_source`` (ArrayRecord, no TensorFlow needed).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import importlib.util
import io
import json
import logging
import multiprocessing
import os
import pathlib
import tarfile

import ml_collections
import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclasses.dataclass(frozen=True)
class ImageDataset:
  """uint8 images (N, H, W, 3), int32 labels (N,), and the class names."""

  images: np.ndarray
  labels: np.ndarray
  class_names: tuple[str, ...]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return len(self.labels)


class DatasetError(ValueError):
  """A dataset that is missing, empty or corrupt; the message names the fix."""


# ----------------------------------------------------------------------------------
# Synthetic: a Gaussian mixture in image space.
# ----------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------
# Image folder: split/class/*.jpg in a directory or a .tar.gz.
# ----------------------------------------------------------------------------------
def _decode(item: tuple[str, bytes], size: int | None) -> np.ndarray:
  name, data = item
  try:
    with Image.open(io.BytesIO(data)) as im:
      im = im.convert("RGB")
      if size is not None and im.size != (size, size):
        # Resize the shorter side to `size`, then centre-crop a square.
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
      return np.asarray(im, dtype=np.uint8)
  except Exception as e:  # PIL raises several types for bad files
    raise DatasetError(f"Cannot decode image {name!r} ({e}). Remove or replace the file and run again.") from e


def _list_split(path: pathlib.Path, split: str) -> list[tuple[str, str, bytes | None]]:
  """(class, member name, bytes or None for files read later) for every image in split."""
  items = []
  if path.is_dir():
    root = path / split
    if not root.is_dir():
      raise DatasetError(f"No split {split!r} in image folder {path}: expected {root}/<class>/*.jpg.")
    for cls_dir in sorted(p for p in root.iterdir() if p.is_dir()):
      for f in sorted(cls_dir.iterdir()):
        if f.suffix.lower() in IMAGE_SUFFIXES:
          items.append((cls_dir.name, str(f), None))
    return items
  with tarfile.open(path, "r:*") as tar:
    for member in tar:
      parts = pathlib.PurePosixPath(member.name).parts
      parts = parts[1:] if parts and parts[0] == "." else parts
      # Accept split/class/file or a single top folder before it.
      for offset in (0, 1):
        if len(parts) == offset + 3 and parts[offset] == split:
          if member.isfile() and pathlib.PurePosixPath(parts[-1]).suffix.lower() in IMAGE_SUFFIXES:
            items.append((parts[offset + 1], member.name, tar.extractfile(member).read()))
          break
  return sorted(items, key=lambda t: t[1])


def _cache_key(path: pathlib.Path, split: str, size: int | None) -> str:
  stat = path.stat()
  ident = f"{path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}|{split}|{size}"
  return hashlib.sha1(ident.encode()).hexdigest()[:16]


def image_folder(path: str, split: str, image_size: int | None, cache_dir: str | None, workers: int = 0) -> ImageDataset:
  """Decode ``path`` (a directory or .tar.gz of split/class/*.jpg) once, then cache it.

  Args:
    path: the folder or archive.
    split: e.g. "train" or "test".
    image_size: resize (shorter side) and centre-crop to this size; None keeps the
      images as they are (they must then share one size, as CIFAR's do).
    cache_dir: where the decoded uint8 arrays are kept; None disables the cache.
    workers: decoding processes (0: one per core).
  """
  src = pathlib.Path(path).expanduser()
  if not src.exists():
    raise DatasetError(
        f"Image folder {src} does not exist. Point config.data.path at a directory or .tar.gz "
        "laid out as split/class/*.jpg (for CIFAR-10 here: ../shared/data/cifar10-jpeg.tar.gz).")
  cache = None
  if cache_dir:
    cache = pathlib.Path(cache_dir) / f"{src.name}-{split}-{_cache_key(src, split, image_size)}.npz"
    if cache.exists():
      try:
        with np.load(cache) as f:
          return ImageDataset(f["images"], f["labels"], tuple(json.loads(str(f["classes"]))))
      except Exception as e:  # a torn or corrupt cache file: decode again
        logging.warning("Ignoring unreadable cache %s (%s); decoding again.", cache, e)
  items = _list_split(src, split)
  if not items:
    raise DatasetError(f"No images found for split {split!r} in {src}: expected {split}/<class>/*.jpg.")
  classes = sorted({c for c, _, _ in items})
  index = {c: i for i, c in enumerate(classes)}
  payloads = [(name, data if data is not None else pathlib.Path(name).read_bytes()) for _, name, data in items]
  workers = workers or os.cpu_count() or 1
  logging.info("Decoding %d images of %s/%s with %d processes.", len(payloads), src, split, workers)
  chunk = max(1, len(payloads) // (workers * 8))
  if workers > 1 and len(payloads) > 1000:
    # "spawn": forking a process that runs JAX's threads can deadlock.
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
      decoded = list(pool.map(_decode, payloads, [image_size] * len(payloads), chunksize=chunk))
  else:
    decoded = [_decode(p, image_size) for p in payloads]
  shapes = {a.shape for a in decoded}
  if len(shapes) != 1:
    raise DatasetError(f"Images in {src}/{split} have different sizes {sorted(shapes)[:3]}...; set config.data.image_size.")
  images = np.stack(decoded)
  labels = np.array([index[c] for c, _, _ in items], np.int32)
  if cache is not None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    # A temporary name of this process's own (runs started together share the cache and
    # decode at once), then an atomic rename: a crash never leaves a half-written cache.
    tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, images=images, labels=labels, classes=json.dumps(classes))
    os.replace(tmp, cache)
  return ImageDataset(images, labels, tuple(classes))


# ----------------------------------------------------------------------------------
# TFDS: ArrayRecord without TensorFlow, or any prepared format through tfds.load.
# ----------------------------------------------------------------------------------
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


def tfds_source(name: str, split: str, data_dir: str | None, image_size: int | None) -> ImageDataset:
  examples, count = tfds_examples(name, split, data_dir)
  logging.info("Reading %d examples of TFDS %s/%s.", count, name, split)
  images, labels = [], []
  for i, example in enumerate(examples):
    image = _rgb(np.asarray(example["image"], np.uint8))
    if image_size is not None and image.shape[:2] != (image_size, image_size):
      image = _decode((f"{name}[{i}]", _png_bytes(image)), image_size)
    images.append(image)
    labels.append(int(example["label"]))
  num_classes = int(max(labels)) + 1
  return ImageDataset(np.stack(images), np.array(labels, np.int32), tuple(str(i) for i in range(num_classes)))


def _rgb(image: np.ndarray) -> np.ndarray:
  """(H, W, 1) or (H, W) grayscale -> (H, W, 3); RGB unchanged."""
  if image.ndim == 2:
    image = image[..., None]
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def _png_bytes(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(array, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


# ----------------------------------------------------------------------------------
# Dispatch.
# ----------------------------------------------------------------------------------
SOURCES = ("synthetic", "image_folder", "tfds")


def load(data_cfg: ml_collections.ConfigDict, split: str, cache_dir: str | None = None) -> ImageDataset:
  """The dataset named by ``config.data`` for one split ("train" or "test")."""
  if data_cfg.source == "synthetic":
    n = data_cfg.num_train if split == "train" else data_cfg.num_test
    return synthetic(n, data_cfg.image_size, data_cfg.num_classes, seed=0 if split == "train" else 1)
  if data_cfg.source == "image_folder":
    split_name = data_cfg.train_split if split == "train" else data_cfg.test_split
    size = data_cfg.decode_size or None
    return image_folder(data_cfg.path, split_name, size, data_cfg.cache_dir or cache_dir)
  if data_cfg.source == "tfds":
    split_name = data_cfg.train_split if split == "train" else data_cfg.test_split
    return tfds_source(data_cfg.tfds_name, split_name, data_cfg.tfds_data_dir, data_cfg.decode_size or None)
  raise ValueError(f"Unknown data source {data_cfg.source!r}; choose one of {SOURCES}.")
