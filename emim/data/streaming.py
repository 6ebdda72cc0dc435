"""A streaming input pipeline for datasets too large to hold on the device (ImageNet).

A Grain ``MapDataset`` over a random-access source (an image-folder directory or a
prepared TFDS dataset), sharded per process, shuffled with a new permutation each epoch,
decoded on host workers (shorter side resized to ``decode_size``, centre square), and
batched. The per-example augmentations (random resized crop, flip, colour, blur,
solarisation) then run on the device, as for in-memory data.

The data position is a function of the step: batch ``s`` of the pipeline is the same
whenever it is asked for, so a resumed run starts the pipeline at its restored step
(``make_stream(..., start_step=s)``) and sees exactly the batches an uninterrupted run
sees. Nothing about the iterator needs to be saved in the checkpoint.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Iterator

import grain
import jax
import ml_collections
import numpy as np

from emim.data.sources import IMAGE_SUFFIXES, DatasetError, _decode


def image_folder_records(path: str, split: str) -> tuple[list[tuple[str, int]], tuple[str, ...]]:
  """(file, label) for every image of ``path/split/<class>/``, in a fixed order."""
  root = pathlib.Path(path).expanduser() / split
  if not root.is_dir():
    raise DatasetError(
        f"Streaming needs an image-folder directory: {root} does not exist. Unpack the archive "
        "(streaming reads files at random), or use --config.data.stream=False for data that fits in memory.")
  classes = tuple(sorted(p.name for p in root.iterdir() if p.is_dir()))
  records = [(str(f), label) for label, c in enumerate(classes)
             for f in sorted((root / c).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
  if not records:
    raise DatasetError(f"No images in {root}/<class>/.")
  return records, classes


class _DecodeFile(grain.transforms.Map):
  """(file, label) -> {"images": uint8 (S, S, 3), "labels": int32}."""

  def __init__(self, size: int):
    self.size = size

  def map(self, record):
    path, label = record
    image = _decode((path, pathlib.Path(path).read_bytes()), self.size)
    return {"images": image, "labels": np.int32(label)}


class _DecodeTfds(grain.transforms.Map):
  """A TFDS example -> {"images": uint8 (S, S, 3), "labels": int32}."""

  def __init__(self, size: int):
    self.size = size

  def map(self, example):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(example["image"], np.uint8)).save(buf, format="PNG")
    return {"images": _decode(("tfds example", buf.getvalue()), self.size), "labels": np.int32(example["label"])}


def stream_source(data_cfg: ml_collections.ConfigDict, split: str) -> tuple[Any, grain.transforms.Map, int]:
  """(random-access records, decode transform, number of classes) for config.data."""
  size = data_cfg.decode_size or data_cfg.image_size
  split_name = data_cfg.train_split if split == "train" else data_cfg.test_split
  if data_cfg.source == "image_folder":
    records, classes = image_folder_records(data_cfg.path, split_name)
    return records, _DecodeFile(size), len(classes)
  if data_cfg.source == "tfds":
    import tensorflow_datasets as tfds

    try:
      source = tfds.data_source(data_cfg.tfds_name, split=split_name, data_dir=data_cfg.tfds_data_dir or None, download=False)
    except Exception as e:
      raise DatasetError(f"TFDS dataset {data_cfg.tfds_name!r} is not prepared ({e}); see the README's Data section.") from e
    return source, _DecodeTfds(size), data_cfg.num_classes
  raise DatasetError(f"Streaming reads 'image_folder' or 'tfds' sources, not {data_cfg.source!r}.")


def make_stream(records, decode: grain.transforms.Map, global_batch_size: int, seed: int, start_step: int = 0,
                workers: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """This process's share of the global batches, from ``start_step`` on, forever.

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
  ds = grain.MapDataset.source(records)[index::processes]
  ds = ds.shuffle(seed=seed).repeat(None).map(decode).batch(global_batch_size // processes, drop_remainder=True)
  it = ds[start_step:].to_iter_dataset()
  if workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return iter(it)


@dataclasses.dataclass(frozen=True)
class StreamSplit:
  """One split of a streamed dataset, for the evaluation program: records, their
  decoder and the number of classes."""

  records: Any
  decode: grain.transforms.Map
  num_classes: int

  def __len__(self) -> int:
    return len(self.records)

  def ordered_batches(self, batch_size: int, workers: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, in order (the last batch may be short)."""
    ds = grain.MapDataset.source(self.records).map(self.decode).batch(batch_size, drop_remainder=False)
    it = ds.to_iter_dataset()
    if workers > 0:
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(it)

  def shuffled_batches(self, batch_size: int, seed: int, workers: int = 0) -> Iterator[dict[str, np.ndarray]]:
    return make_stream(self.records, self.decode, batch_size, seed, 0, workers)


def stream_split(data_cfg: ml_collections.ConfigDict, split: str) -> StreamSplit:
  return StreamSplit(*stream_source(data_cfg, split))
