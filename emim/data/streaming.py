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
import pathlib
from typing import Any, Iterator

import grain
import jax
import ml_collections
import numpy as np
from absl import flags
from PIL import Image

from emim.data.sources import DatasetError, directory_classes, label_index, tfds_class_names


def image_folder_records(path: str, split: str, train_classes: tuple[str, ...] | None = None,
                         ) -> tuple[list[tuple[str, int]], tuple[str, ...]]:
  """(file, label) for every image of ``path/split/<class>/``, in a fixed order, and the
  class names the labels number: the training split's (``train_classes``; None: this
  split's own), matched by name, as the in-memory loader does."""
  root = pathlib.Path(path).expanduser()
  if not (root / split).is_dir():
    raise DatasetError(
        f"Streaming needs an image-folder directory: {root / split} does not exist. Unpack the archive "
        "(streaming reads files at random), or use --config.data.stream=False for data that fits in memory.")
  files = directory_classes(root, split)
  classes = tuple(train_classes) if train_classes is not None else tuple(files)
  index = label_index(files, classes, split, root)
  return [(str(f), index[c]) for c, paths in files.items() for f in paths], classes


def _open_file(record) -> tuple[Image.Image, int, str]:
  path, label = record
  try:
    with Image.open(path) as im:
      return im.convert("RGB"), label, path
  except Exception as e:
    raise DatasetError(f"Cannot decode image {path!r} ({e}). Remove or replace the file and run again.") from e


def _open_tfds(example) -> tuple[Image.Image, int, str]:
  image = np.asarray(example["image"], np.uint8)
  image = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image  # grayscale (MNIST)
  return Image.fromarray(image).convert("RGB"), int(example["label"]), "tfds example"


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

  def __init__(self, open_fn, size: int):
    self.open_fn, self.size = open_fn, size

  def map(self, record):
    im, label, _ = self.open_fn(record)
    return {"images": _centre_square(im, self.size), "labels": np.int32(label)}


class TwoCropDecode(grain.transforms.RandomMap):
  """record -> {"views": uint8 (2, S, S, 3), "labels"}: the two training views' random
  resized crops, taken on the host from the full decoded image (the rest of each
  view's augmentation runs on the device). Grain seeds ``rng`` from the dataset seed and
  the element's index, so the crops are a function of the step too."""

  def __init__(self, open_fn, size: int, scales, ratio=(3 / 4, 4 / 3)):
    self.open_fn, self.size, self.scales, self.ratio = open_fn, size, tuple(scales), ratio

  def random_map(self, record, rng: np.random.Generator):
    im, label, _ = self.open_fn(record)
    views = [np.asarray(im.resize((self.size, self.size), Image.BILINEAR, box=_random_box(rng, *im.size, scale, self.ratio)), np.uint8)
             for scale in self.scales]
    return {"views": np.stack(views), "labels": np.int32(label)}


def stream_source(data_cfg: ml_collections.ConfigDict, split: str) -> tuple[Any, Any, tuple[str, ...]]:
  """(random-access records, a function record -> (PIL image, label, name), the class
  names the labels number: the training split's)."""
  split_name = data_cfg.train_split if split == "train" else data_cfg.test_split
  if data_cfg.source == "image_folder":
    train_classes = None
    if split != "train":
      _, train_classes = image_folder_records(data_cfg.path, data_cfg.train_split)
    records, classes = image_folder_records(data_cfg.path, split_name, train_classes)
    return records, _open_file, classes
  if data_cfg.source == "tfds":
    import tensorflow_datasets as tfds

    try:
      source = tfds.data_source(data_cfg.tfds_name, split=split_name, data_dir=data_cfg.tfds_data_dir or None, download=False)
    except Exception as e:
      raise DatasetError(
          f"TFDS dataset {data_cfg.tfds_name!r} split {split_name!r} is not prepared as ArrayRecord ({e}). Streaming "
          f"reads at random, which needs ArrayRecord: tfds build {data_cfg.tfds_name} --file_format=array_record "
          "(see the README's Data section).") from e
    names = tfds_class_names(data_cfg.tfds_name, data_cfg.tfds_data_dir)
    return source, _open_tfds, names or tuple(str(i) for i in range(data_cfg.num_classes))
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
    raise ValueError(f"The global batch size {global_batch_size} is not divisible by the {processes} processes.")
  ds = grain.MapDataset.source(records).shuffle(seed=seed).repeat(None)
  ds = ds.random_map(decode, seed=seed) if isinstance(decode, grain.transforms.RandomMap) else ds.map(decode)
  ds = _ProcessRows(ds, global_batch_size, processes, index)
  ds = ds.batch(global_batch_size // processes, drop_remainder=True)
  it = ds[start_step:].to_iter_dataset()
  if workers > 0:
    _absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return iter(it)


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
  decode: grain.transforms.Map
  class_names: tuple[str, ...]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return len(self.records)

  def ordered_batches(self, batch_size: int, workers: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, in order (the last batch may be short)."""
    ds = grain.MapDataset.source(self.records).map(self.decode).batch(batch_size, drop_remainder=False)
    it = ds.to_iter_dataset()
    if workers > 0:
      _absl_flags_parsed()
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(it)

  def shuffled_batches(self, batch_size: int, seed: int, workers: int = 0) -> Iterator[dict[str, np.ndarray]]:
    return make_stream(self.records, self.decode, batch_size, seed, 0, workers)


def stream_split(data_cfg: ml_collections.ConfigDict, split: str) -> StreamSplit:
  """A split for evaluation: centre squares of ``decode_size``."""
  records, open_fn, class_names = stream_source(data_cfg, split)
  return StreamSplit(records, CentreDecode(open_fn, data_cfg.decode_size or data_cfg.image_size), class_names)
