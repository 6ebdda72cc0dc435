"""A streaming input pipeline for datasets too large to hold on the device (ImageNet).

A Grain ``MapDataset`` over a random-access source (an image-folder directory or a
prepared TFDS dataset), shuffled with a new permutation each epoch, decoded on host
workers, where each view's random resized crop is taken from the full image, and
batched; each process reads and decodes only its own rows of every global batch. The
global batches, their order and their crops are the same whatever the number of
processes (one host or a pod read the same run). The rest of each view's augmentation (flip, colour, blur,
solarisation) then runs on the device, one key per example, as for in-memory data.

The iterator's state (per process: how far it has read, and its workers' positions) is
saved in every checkpoint beside the train state and set again on resume, so a resumed run
sees exactly the batches an uninterrupted run sees. The pipeline is also a function of the
step (batch ``s`` is the same whenever it is asked for), which ``start_step`` uses to
start a stream at a given batch without a saved state.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import pathlib
from typing import Any, Iterator

import grain
import jax
import ml_collections
import numpy as np
from absl import flags
from PIL import Image

from emim.config_base import ConfigError
from emim.data.dataset import DatasetError
from emim.data.image_folder import directory_classes
from emim.data.labels import class_subset, label_index
from emim.data.prepare import check_image_folder
from emim.data.tfds_source import tfds_stream_records


def image_folder_records(path: str, split: str, train_classes: tuple[str, ...] | None = None,
                         subset: tuple[str, ...] | None = None) -> tuple[list[tuple[str, int]], tuple[str, ...]]:
  """(file, label) for every image of ``path/split/<class>/``, in a fixed order, and the
  class names the labels number: the training split's (``train_classes``; None: this
  split's own), matched by name, as the in-memory loader does; only the classes of
  ``subset`` (config.data.class_subset) when given."""
  root = pathlib.Path(path).expanduser()
  if not (root / split).is_dir():
    if root.is_dir():
      splits = sorted(p.name for p in root.iterdir() if p.is_dir())
      raise DatasetError(
          f"{root} has no split {split!r} (it holds {splits[:6]}): name the split's folder with "
          "--config.data.train_split / --config.data.test_split, or point --config.data.path at the folder that "
          "holds train/ and the test split.")
    raise DatasetError(
        f"Streaming needs an image-folder directory: {root} does not exist or is not a directory. Check "
        "--config.data.path; an archive must be unpacked (streaming reads files at random), or use "
        "--config.data.stream=False for data that fits in memory.")
  files = directory_classes(root, split, subset)
  classes = tuple(train_classes) if train_classes is not None else tuple(files)
  index = label_index(files, classes, split, root)
  return [(str(f), index[c]) for c, paths in files.items() for f in paths], classes


# Records open lazily: ``open_fn(record) -> (PIL image, header read, not decoded; label;
# name)``, so that a JPEG can be decoded straight at a reduced scale (``_decode``).
def _open_file(record) -> tuple[Image.Image, int, str]:
  path, label = record
  try:
    return Image.open(path), label, path
  except Exception as e:
    raise DatasetError(f"Cannot decode image {path!r} ({e}). Remove or replace the file and run again.") from e


def _open_tfds(example) -> tuple[Image.Image, int, str]:
  image = example["image"]
  if isinstance(image, bytes):  # left encoded (SkipDecoding): decoded by _decode
    return Image.open(io.BytesIO(image)), int(example["label"]), "tfds example"
  image = np.asarray(image, np.uint8)
  image = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image  # grayscale (MNIST)
  return Image.fromarray(image), int(example["label"]), "tfds example"


def _decode(im: Image.Image, keep: float, name: str, reduce: bool = True) -> tuple[Image.Image, float, float]:
  """``im`` decoded in RGB, a JPEG at the smallest DCT scale (1/2, 1/4 or 1/8, PIL's
  ``draft``) that keeps at least the fraction ``keep`` of its width and height, so no
  crop taken from it falls below its output size; returns the image and its width and
  height as fractions of the original's. Decoding a 500x375 JPEG at 1/4 costs a fraction
  of a full decode (benchmarks/input_pipeline.py)."""
  w, h = im.size
  try:
    if reduce and keep < 1.0 and im.format == "JPEG":
      im.draft("RGB", (max(1, math.ceil(w * keep)), max(1, math.ceil(h * keep))))
    rgb = im.convert("RGB")
  except Exception as e:  # PIL raises several types for bad files
    raise DatasetError(f"Cannot decode image {name!r} ({e}). Remove or replace the file and run again.") from e
  return rgb, rgb.size[0] / w, rgb.size[1] / h


def _centre_square(im: Image.Image, size: int) -> np.ndarray:
  """Shorter side resized to ``size``, then the central square."""
  w, h = im.size
  s = size / min(w, h)
  im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
  left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
  return np.asarray(im.crop((left, top, left + size, top + size)), np.uint8)


def _random_box(rng: np.random.Generator, w: int, h: int, scale, ratio) -> tuple[float, float, float, float]:
  """An Inception-style crop box (left, top, right, bottom): area fraction ~ U(scale),
  log aspect ratio ~ U(log ratio), clipped to the image, placed uniformly."""
  area = w * h * rng.uniform(*scale)
  aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
  cw, ch = min(w, max(1.0, np.sqrt(area * aspect))), min(h, max(1.0, np.sqrt(area / aspect)))
  left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
  return left, top, left + cw, top + ch


class CentreDecode(grain.transforms.Map):
  """record -> {"images": uint8 (S, S, 3), "labels"}: the evaluation view."""

  def __init__(self, open_fn, size: int, reduce: bool = True):
    self.open_fn, self.size, self.reduce = open_fn, size, reduce

  def map(self, record):
    im, label, name = self.open_fn(record)
    rgb, _, _ = _decode(im, self.size / min(im.size), name, self.reduce)
    return {"images": _centre_square(rgb, self.size), "labels": np.int32(label)}


class TwoCropDecode(grain.transforms.RandomMap):
  """record -> {"views": uint8 (2, S, S, 3), "labels"}: the two training views' random
  resized crops, their boxes drawn on the full image and taken on the host (the rest of
  each view's augmentation runs on the device). A JPEG is decoded at the smallest scale
  that leaves both boxes at least S pixels on each side (``reduce``): the boxes, and so
  the crops' distribution, are those of the full image. Grain seeds ``rng`` from the
  dataset seed and the element's index, so the crops are a function of the step too."""

  def __init__(self, open_fn, size: int, scales, ratio=(3 / 4, 4 / 3), reduce: bool = True):
    self.open_fn, self.size, self.scales, self.ratio, self.reduce = open_fn, size, tuple(scales), ratio, reduce

  def random_map(self, record, rng: np.random.Generator):
    im, label, name = self.open_fn(record)
    boxes = [_random_box(rng, *im.size, scale, self.ratio) for scale in self.scales]
    keep = max(self.size / min(right - left, bottom - top) for left, top, right, bottom in boxes)
    rgb, sx, sy = _decode(im, keep, name, self.reduce)
    views = [np.asarray(rgb.resize((self.size, self.size), Image.BILINEAR, box=(l * sx, t * sy, r * sx, b * sy)),
                        np.uint8) for l, t, r, b in boxes]
    return {"views": np.stack(views), "labels": np.int32(label)}


def stream_source(data_cfg: ml_collections.ConfigDict, split: str) -> tuple[Any, Any, tuple[str, ...]]:
  """(random-access records, a function record -> (PIL image, label, name), the class
  names the labels number: the training split's)."""
  split_name = data_cfg.train_split if split == "train" else data_cfg.test_split
  subset = class_subset(data_cfg)
  if data_cfg.source == "image_folder":
    check_image_folder(data_cfg)  # a missing folder: the command that prepares it
    train_classes = None
    if split != "train":
      _, train_classes = image_folder_records(data_cfg.path, data_cfg.train_split, subset=subset)
    records, classes = image_folder_records(data_cfg.path, split_name, train_classes, subset)
    return records, _open_file, classes
  if data_cfg.source == "tfds":
    records, names = tfds_stream_records(data_cfg.tfds_name, split_name, data_cfg.tfds_data_dir, subset)
    return records, _open_tfds, names or tuple(str(i) for i in range(data_cfg.num_classes))
  raise DatasetError(f"Streaming reads 'image_folder' or 'tfds' sources, not {data_cfg.source!r}.")


class _ProcessRows(grain.MapDataset):
  """This process's rows of every global batch of ``parent`` (the global sequence of
  examples): with global batch B over P processes (b = B / P rows each), element k of
  process p is element (k // b) * B + p * b + k % b of the global sequence."""

  def __init__(self, parent: grain.MapDataset, global_batch_size: int, processes: int, index: int):
    super().__init__(parent)
    self._global, self._local = global_batch_size, global_batch_size // processes
    self._offset = index * self._local

  def __len__(self) -> int:
    return len(self._parent) // self._global * self._local

  def _global_index(self, k: int) -> int:
    return (k // self._local) * self._global + self._offset + k % self._local

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    return self._parent[self._global_index(index)]

  def __str__(self) -> str:
    return f"ProcessRows(offset={self._offset}, rows={self._local} of {self._global})"


def make_stream(records, decode: grain.transforms.Map, global_batch_size: int, seed: int, start_step: int = 0,
                workers: int = 0) -> grain.DatasetIterator:
  """This process's rows of the global batches, from ``start_step`` on, forever: an
  iterator whose ``get_state()``/``set_state()`` the checkpoints save and restore.

  The shuffle (a new permutation each epoch) and the random crops are drawn over the
  global sequence of examples, each crop seeded by its example's place in it, and each
  process takes its rows of every global batch: the global batches are the same however
  many processes read them.

  Args:
    records: a random-access sequence of examples.
    decode: the per-example host transform.
    global_batch_size: divided evenly over the processes.
    seed: the shuffle seed; each epoch is reshuffled.
    start_step: the first batch to produce (the restored step when resuming).
    workers: host decoding processes (0: decode in this process).
  """
  processes, index = jax.process_count(), jax.process_index()
  if global_batch_size % processes:
    raise ConfigError(f"--config.train.batch_size={global_batch_size} is not divisible by the {processes} processes: "
                      f"set a multiple of {processes}.")
  ds = grain.MapDataset.source(records).shuffle(seed=seed).repeat(None)
  ds = ds.random_map(decode, seed=seed) if isinstance(decode, grain.transforms.RandomMap) else ds.map(decode)
  ds = _ProcessRows(ds, global_batch_size, processes, index)
  ds = ds.batch(global_batch_size // processes, drop_remainder=True)
  return iter(_read_batches(ds[start_step:], workers))


def read_ahead(workers: int) -> grain.ReadOptions:
  """How many batches are decoded at once, and so held ahead of the consumer: each batch
  is one task (its images decoded in turn; PIL lets threads decode at once), so the
  batches in flight are the parallelism. The host's cores shared out: in this process one
  thread per core, in each of ``workers`` processes cores / workers; at most 16. Grain's
  default, 16 threads and 500 batches ahead, held up to 500 batches (150 GB of
  ImageNet's 1024 two-view crops) wherever the host decodes faster than the accelerator
  trains, and in every worker."""
  threads = max(1, min(16, (os.cpu_count() or 1) // max(workers, 1)))
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads)


def _read_batches(ds: grain.MapDataset, workers: int) -> grain.IterDataset:
  """The batches of ``ds`` read ahead in this process or in ``workers`` processes, with
  a bounded number of them in flight (``read_ahead``)."""
  it = ds.to_iter_dataset(read_ahead(workers))
  if workers > 0:
    _absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return it


def _absl_flags_parsed() -> None:
  """Grain's worker processes read absl flags; outside an absl app (a notebook, a test)
  nothing has parsed them, so take their defaults."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


@dataclasses.dataclass(frozen=True)
class StreamSplit:
  """One split of a streamed dataset, for the evaluation program: records, their
  decoder and the class names the labels number."""

  records: Any
  decode: grain.transforms.Map  # the centre view
  class_names: tuple[str, ...]
  train_decode: grain.transforms.RandomMap | None = None  # one random resized crop (the probe)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return len(self.records)

  def ordered_batches(self, batch_size: int, workers: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, in order (the last batch may be short)."""
    ds = grain.MapDataset.source(self.records).map(self.decode).batch(batch_size, drop_remainder=False)
    return iter(_read_batches(ds, workers))

  def shuffled_batches(self, batch_size: int, seed: int, workers: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Batches of random resized crops of the full images (``train_decode``), reshuffled
    every epoch, each process its rows of every batch: {"images", "labels"}."""
    stream = make_stream(self.records, self.train_decode or self.decode, batch_size, seed, 0, workers)
    for batch in stream:
      yield {"images": batch["views"][:, 0], "labels": batch["labels"]} if "views" in batch else batch


def stream_split(data_cfg: ml_collections.ConfigDict, split: str) -> StreamSplit:
  """A split for evaluation: centre squares of ``decode_size``, and for the probe's
  training, random resized crops (scale 0.08 to 1) of ``image_size``."""
  records, open_fn, class_names = stream_source(data_cfg, split)
  reduce = data_cfg.get("reduced_decode", True)
  decode = CentreDecode(open_fn, data_cfg.decode_size or data_cfg.image_size, reduce)
  crop = TwoCropDecode(open_fn, data_cfg.image_size, ((0.08, 1.0),), reduce=reduce)
  return StreamSplit(records, decode, class_names, crop)
