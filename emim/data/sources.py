"""Where images come from: a synthetic mixture, an image folder, or a TFDS dataset (and
vectors: a Gaussian mixture in R^d, emim/data/mixture.py).

Each image source returns an ``ImageDataset`` of uint8 images in memory. The image folder is
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
import zlib

import ml_collections
import numpy as np
from PIL import Image

from emim.config_base import VECTOR_SOURCES
from emim.data import class_lists, mixture

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclasses.dataclass(frozen=True)
class ImageDataset:
  """uint8 images (N, H, W, 3), int32 labels (N,), and the class names."""

  images: np.ndarray
  labels: np.ndarray
  class_names: tuple[str, ...]

  input_key = "images"  # the key of the inputs in a batch (VectorDataset: "vectors")

  @property
  def inputs(self) -> np.ndarray:
    return self.images

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


def class_subset(data_cfg: ml_collections.ConfigDict) -> tuple[str, ...] | None:
  """The classes ``config.data.class_subset`` keeps, sorted (their labels' order): a
  named subset of emim/data/class_lists.py ("imagenet100"), or a file of class names, one
  per line; None keeps every class."""
  name = data_cfg.get("class_subset", "")
  if not name:
    return None
  if name in class_lists.SUBSETS:
    return tuple(sorted(class_lists.SUBSETS[name]))
  path = pathlib.Path(name).expanduser()
  if path.is_file():
    names = {line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")}
    if not names:
      raise DatasetError(f"--config.data.class_subset={name!r}: the file names no classes. Write one class name "
                         "(its folder or TFDS label name) per line, or set --config.data.class_subset='' for all.")
    return tuple(sorted(names))
  raise DatasetError(f"--config.data.class_subset={name!r} is neither a known subset ({', '.join(class_lists.SUBSETS)}) "
                     "nor a file of class names, one per line.")


def _check_subset_present(found, subset, split: str, where) -> None:
  """The training split must hold every class of the subset (else the labels would not be
  the subset's); other splits may lack some."""
  missing = sorted(set(subset) - set(found))
  if missing and split_is_train(split):
    raise DatasetError(f"Split {split!r} of {where} lacks {len(missing)} class(es) of --config.data.class_subset: "
                       f"{missing[:5]}{' ...' if len(missing) > 5 else ''}. Point config.data.path at a folder with "
                       "all of them (for ImageNet-100: the full ImageNet train/ folder, or one prepared with them).")


def split_is_train(split: str) -> bool:
  return split.startswith("train")


def directory_classes(path: pathlib.Path, split: str, subset: tuple[str, ...] | None = None,
                      ) -> dict[str, list[pathlib.Path]]:
  """{class: its image files, sorted} of ``path/split/<class>/`` (only the classes of
  ``subset`` when given); a class folder without images is an error that names it (the
  labels would silently shift without it)."""
  root = path / split
  if not root.is_dir():
    raise DatasetError(f"No split {split!r} in image folder {path}: expected {root}/<class>/*.jpg.")
  folders = sorted(p for p in root.iterdir() if p.is_dir())
  if subset is not None:
    _check_subset_present({p.name for p in folders}, subset, split, root)
    keep = set(subset)
    folders = [p for p in folders if p.name in keep]
  classes = {}
  for cls_dir in folders:
    files = sorted(f for f in cls_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
      raise DatasetError(f"The class folder {cls_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}): add its images "
                         "or remove the folder, so that every class of the split has examples.")
    classes[cls_dir.name] = files
  if not classes:
    raise DatasetError(f"No images found for split {split!r} in {path}: expected {root}/<class>/*.jpg.")
  return classes


def _archive_members(path: pathlib.Path, split: str, read: bool, subset: tuple[str, ...] | None = None,
                     ) -> list[tuple[str, str, bytes | None]]:
  """(class, member name, bytes when ``read``) for every image of ``split`` in a tar
  archive laid out as split/class/file (or one top folder before it); only the classes
  of ``subset`` when given."""
  keep = None if subset is None else set(subset)
  items, class_dirs, seen = [], set(), set()
  try:
    with tarfile.open(path, "r:*") as tar:
      for member in tar:
        parts = pathlib.PurePosixPath(member.name).parts
        parts = parts[1:] if parts and parts[0] == "." else parts
        for offset in (0, 1):
          if len(parts) == offset + 2 and parts[offset] == split and member.isdir():
            class_dirs.add(parts[offset + 1])
          if len(parts) == offset + 3 and parts[offset] == split:
            seen.add(parts[offset + 1])
            if keep is not None and parts[offset + 1] not in keep:
              break
            if member.isfile() and pathlib.PurePosixPath(parts[-1]).suffix.lower() in IMAGE_SUFFIXES:
              items.append((parts[offset + 1], member.name, tar.extractfile(member).read() if read else None))
            break
  except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
    raise DatasetError(f"Cannot read the archive {path} ({type(e).__name__}: {e}): it is truncated or corrupt. "
                       "Copy or download it again, or point config.data.path at the unpacked folder.") from e
  if subset is not None:
    _check_subset_present(seen | class_dirs, subset, split, path)
    class_dirs &= keep
  empty = sorted(class_dirs - {c for c, _, _ in items})
  if empty:
    raise DatasetError(f"The class folder(s) {empty} of split {split!r} in {path} hold no images: add their "
                       "images or remove the folders, so that every class of the split has examples.")
  if not items:
    raise DatasetError(f"No images found for split {split!r} in {path}: expected {split}/<class>/*.jpg.")
  return sorted(items, key=lambda t: t[1])


def _list_split(path: pathlib.Path, split: str, subset=None) -> list[tuple[str, str, bytes | None]]:
  """(class, member name, bytes or None for files read later) for every image in split."""
  if path.is_dir():
    return [(c, str(f), None) for c, files in directory_classes(path, split, subset).items() for f in files]
  return _archive_members(path, split, read=True, subset=subset)


def folder_class_names(path: str, split: str, subset: tuple[str, ...] | None = None) -> tuple[str, ...]:
  """The sorted class names of one split of an image folder (directory or archive)."""
  src = pathlib.Path(path).expanduser()
  if src.is_dir():
    return tuple(directory_classes(src, split, subset))
  return tuple(sorted({c for c, _, _ in _archive_members(src, split, read=False, subset=subset)}))


def label_index(split_classes, train_classes: tuple[str, ...], split: str, where) -> dict[str, int]:
  """Each class of ``split`` -> its label: its index among the training split's classes
  (by name), so every split numbers a class alike; a class the training split does not
  have is an error that names it."""
  index = {c: i for i, c in enumerate(train_classes)}
  unknown = sorted(set(split_classes) - set(index))
  if unknown:
    raise DatasetError(f"Split {split!r} of {where} has classes the training split does not: {unknown[:5]}. The "
                       "labels number the training split's classes; remove those folders from the split, or add "
                       "them to the training split.")
  return index


def _cache_key(path: pathlib.Path, split: str, size: int | None, subset=None) -> str:
  """A hash of everything the decoded split depends on: for a directory, every image's
  relative name, size and modification time (so an added, removed or replaced file
  decodes again); for an archive, its own; and the class subset."""
  h = hashlib.sha1(f"{path.resolve()}|{split}|{size}|{subset}".encode())
  if path.is_dir():
    for cls, files in directory_classes(path, split, subset).items():
      for f in files:
        stat = f.stat()
        h.update(f"|{cls}/{f.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
  else:
    stat = path.stat()
    h.update(f"|{stat.st_size}|{stat.st_mtime_ns}".encode())
  return h.hexdigest()[:16]


def _cache_name(path: pathlib.Path, split: str, key: str) -> str:
  """Short whatever the path (a file name has at most 255 bytes): the folder's name cut
  to 40 characters, the split's to 20, and the key."""
  safe = lambda text, n: "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)[:n]
  return f"{safe(path.name, 40)}-{safe(split, 20)}-{key}.npz"


def image_folder(path: str, split: str, image_size: int | None, cache_dir: str | None, workers: int = 0,
                 train_classes: tuple[str, ...] | None = None, subset: tuple[str, ...] | None = None) -> ImageDataset:
  """Decode ``path`` (a directory or .tar.gz of split/class/*.jpg) once, then cache it.

  Args:
    path: the folder or archive.
    split: e.g. "train" or "test".
    image_size: resize (shorter side) and centre-crop to this size; None keeps the
      images as they are (they must then share one size, as CIFAR's do).
    cache_dir: where the decoded uint8 arrays are kept; None disables the cache.
    workers: decoding processes (0: one per core).
    train_classes: the training split's class names, which number the labels; None:
      this split's own (it is the training split).
    subset: only these classes (config.data.class_subset); None: every class.
  """
  src = pathlib.Path(path).expanduser()
  if not src.exists():
    raise DatasetError(
        f"Image folder {src} does not exist. Point config.data.path at a directory or .tar.gz "
        "laid out as split/class/*.jpg (for CIFAR-10 here: ../shared/data/cifar10-jpeg.tar.gz).")
  cache, dataset = None, None
  if cache_dir:
    cache = pathlib.Path(cache_dir) / _cache_name(src, split, _cache_key(src, split, image_size, subset))
    if cache.exists():
      try:
        with np.load(cache) as f:
          dataset = ImageDataset(f["images"], f["labels"], tuple(json.loads(str(f["classes"]))))
      except Exception as e:  # a torn or corrupt cache file: decode again
        logging.warning("Ignoring unreadable cache %s (%s); decoding again.", cache, e)
  if dataset is None:
    dataset = _decode_split(src, split, image_size, workers, subset)
    if cache is not None:
      _write_cache(cache, dataset)
  if train_classes is None or tuple(train_classes) == dataset.class_names:
    return dataset
  # Cached with this split's own class numbering; relabel by the training split's names.
  index = label_index(dataset.class_names, tuple(train_classes), split, src)
  relabel = np.array([index[c] for c in dataset.class_names], np.int32)
  return ImageDataset(dataset.images, relabel[dataset.labels], tuple(train_classes))


def _write_cache(cache: pathlib.Path, dataset: ImageDataset) -> None:
  """Keep the decoded split for the next run; a cache that cannot be written (a read-only
  folder, a full disk) costs the next run a decode, not this one its work."""
  # A temporary name of this process's own (runs started together share the cache and
  # decode at once), then an atomic rename: a crash never leaves a half-written cache.
  tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
  try:
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(tmp, images=dataset.images, labels=dataset.labels, classes=json.dumps(dataset.class_names))
    os.replace(tmp, cache)
  except OSError as e:
    logging.warning("Cannot write the decode cache %s (%s); continuing without it. Set --config.data.cache_dir to a "
                    "writable folder to keep it.", cache, e)
    try:
      tmp.unlink()
    except OSError:
      pass


def _decode_split(src: pathlib.Path, split: str, image_size: int | None, workers: int, subset=None) -> ImageDataset:
  """Every image of a split, decoded in parallel, labelled by its own sorted classes."""
  items = _list_split(src, split, subset)
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
  shapes = sorted({a.shape for a in decoded})
  if len(shapes) != 1:
    raise DatasetError(
        f"Images in {src}/{split} have different sizes ({', '.join(f'{h}x{w}' for h, w, _ in shapes[:3])}"
        f"{', ...' if len(shapes) > 3 else ''}): set --config.data.decode_size=N to decode each to N x N (the "
        "shorter side resized to N, then the centre square), e.g. the size of the views, config.data.image_size.")
  labels = np.array([index[c] for c, _, _ in items], np.int32)
  return ImageDataset(np.stack(decoded), labels, tuple(classes))


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
      image = _decode((f"{name}[{i}]", _png_bytes(image)), image_size)
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


# ----------------------------------------------------------------------------------
# Dispatch.
# ----------------------------------------------------------------------------------
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
    size, subset = data_cfg.decode_size or None, class_subset(data_cfg)
    if split == "train":
      return image_folder(data_cfg.path, data_cfg.train_split, size, data_cfg.cache_dir or cache_dir, subset=subset)
    if train_classes is None:
      train_classes = folder_class_names(data_cfg.path, data_cfg.train_split, subset)
    return image_folder(data_cfg.path, data_cfg.test_split, size, data_cfg.cache_dir or cache_dir,
                        train_classes=train_classes, subset=subset)
  if data_cfg.source == "tfds":
    split_name = data_cfg.train_split if split == "train" else data_cfg.test_split
    return tfds_source(data_cfg.tfds_name, split_name, data_cfg.tfds_data_dir, data_cfg.decode_size or None,
                       class_subset(data_cfg))
  raise ValueError(f"Unknown data source {data_cfg.source!r}; choose one of {SOURCES}.")
