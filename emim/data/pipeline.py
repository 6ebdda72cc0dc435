"""How batches reach the train step: gathered on device, or streamed from the host.

``DeviceData`` holds a dataset that fits in accelerator memory (CIFAR) on the devices
once; each step gathers its batch there from a per-epoch permutation, so the host does
no per-step work. ``StreamData`` feeds a larger one (ImageNet) from the Grain pipeline
of ``streaming.py``. Both give the loop the same things: sizes, the step's second
argument (``step_fn(parts)`` is ``(state, input) -> (state, metrics)``, with
``input_sharding``, ``example_input()`` to compile for and ``next_input()`` for each
step; ``train.compile_train_step`` compiles it), small decoded subsets for the
evaluators, and ``iterator``, the data position the checkpoints save (None when the
order is a function of the step alone, as on the device).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import ml_collections
import numpy as np

from emim import sharding
from emim.config_base import VECTOR_SOURCES
from emim.data import sources, streaming
from emim.data.dataset import DatasetError, ImageDataset
from emim.train_step import as_rows, device_data_step, train_step


def _subset(dataset, n: int, seed: int):
  """n random examples of an ImageDataset or VectorDataset (the same type back)."""
  idx = np.random.default_rng(seed).permutation(len(dataset))[:n]
  return dataclasses.replace(dataset, **{dataset.input_key: dataset.inputs[idx]}, labels=dataset.labels[idx])


def _device_step_fn(parts, mesh, batch_size: int):
  return functools.partial(device_data_step, parts=parts, batch_size=batch_size,
                           batch_sharding=sharding.batch_sharding(mesh))


def _streamed_step_fn(parts):
  return functools.partial(train_step, parts=parts)


class DeviceData:
  """The whole training set on the devices (replicated): images, or vectors."""

  iterator = None  # each step's batch is a function of the step: nothing to checkpoint

  def __init__(self, train: ImageDataset, mesh, batch_size: int, load_test=None):
    """``train`` placed on the devices; ``load_test()`` gives the test split when an
    evaluator asks for it."""
    self.train, self._mesh, self._batch_size, self._load_test = train, mesh, batch_size, load_test
    replicated = sharding.replicated(mesh)
    self._on_device = {train.input_key: sharding.put_global(as_rows(train.inputs), replicated),
                       "labels": sharding.put_global(train.labels, replicated)}
    logging.info("Data on device: %d %s of %s.", len(train), train.input_key, train.inputs.shape[1:])

  @property
  def num_examples(self) -> int:
    return len(self.train)

  @property
  def num_classes(self) -> int:
    return self.train.num_classes

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.train.class_names

  def step_fn(self, parts):
    """(state, the whole dataset) -> (state, metrics): the batch is gathered inside."""
    return _device_step_fn(parts, self._mesh, self._batch_size)

  @property
  def input_sharding(self):
    return sharding.replicated(self._mesh)

  def example_input(self):
    return self._on_device

  def next_input(self):
    return self._on_device

  def train_subset(self, n: int, seed: int = 0) -> ImageDataset:
    return _subset(self.train, n, seed)

  def test_subset(self, n: int, seed: int = 0) -> ImageDataset:
    if self._load_test is None:
      raise DatasetError("This training data was given without its test split.")
    return _subset(self._load_test(), n, seed)


class StreamData:
  """Batches decoded on host workers by Grain, then sharded onto the mesh."""

  def __init__(self, data_cfg: ml_collections.ConfigDict, augment_cfg: ml_collections.ConfigDict, mesh, seed: int,
               batch_size: int):
    self._cfg, self._mesh, self._seed, self._batch_size = data_cfg, mesh, seed, batch_size
    self._records, open_fn, self._class_names = streaming.stream_source(data_cfg, "train")
    # Training: each view's random resized crop from the full image, on the host.
    reduce = data_cfg.get("reduced_decode", True)
    self._two_crops = streaming.TwoCropDecode(
        open_fn, data_cfg.image_size, (augment_cfg.view1.crop_scale, augment_cfg.view2.crop_scale), reduce=reduce)
    # Evaluators: centre squares.
    self._centre = streaming.CentreDecode(open_fn, data_cfg.decode_size or data_cfg.image_size, reduce)
    logging.info("Streaming %d training images with %d host workers.", len(self._records), data_cfg.workers)
    # The checkpoints save this iterator's state and restore sets it (before the first
    # batch is read for compiling).
    self.iterator = self._stream(start_step=0)
    self._pending = None

  def _stream(self, start_step: int):
    return streaming.make_stream(self._records, self._two_crops, self._batch_size, self._seed, start_step, self._cfg.workers)

  def start_at(self, step: int) -> None:
    """Position the stream at batch ``step`` without a saved iterator state (a checkpoint
    written before the data item existed): the pipeline is a function of the step."""
    logging.warning("The checkpoint has no data-iterator state; starting the stream at batch %d.", step)
    self.iterator = self._stream(start_step=step)
    self._pending = None

  @property
  def num_examples(self) -> int:
    return len(self._records)

  @property
  def num_classes(self) -> int:
    return len(self._class_names)

  @property
  def class_names(self) -> tuple[str, ...]:
    return self._class_names

  def step_fn(self, parts):
    """(state, a global batch) -> (state, metrics)."""
    return _streamed_step_fn(parts)

  @property
  def input_sharding(self):
    return sharding.batch_sharding(self._mesh)

  def example_input(self):
    """The first batch, read now and trained on first (compiling needs its shapes)."""
    if self._pending is None:
      self._pending = self._to_global(next(self.iterator))
    return self._pending

  def next_input(self):
    batch = self.example_input()
    self._pending = None
    return batch

  def _to_global(self, local):
    return sharding.global_batch(local, self.input_sharding)

  def _decoded(self, records, n: int, seed: int) -> ImageDataset:
    idx = np.random.default_rng(seed).permutation(len(records))[:n]
    examples = [self._centre.map(records[int(i)]) for i in idx]
    return ImageDataset(np.stack([e["images"] for e in examples]), np.array([e["labels"] for e in examples], np.int32),
                        self._class_names)

  def train_subset(self, n: int, seed: int = 0) -> ImageDataset:
    return self._decoded(self._records, n, seed)

  def test_subset(self, n: int, seed: int = 0) -> ImageDataset:
    records, _, _ = streaming.stream_source(self._cfg, "test")
    return self._decoded(records, n, seed)


class DataShapes:
  """The training data as a run on ``mesh`` would feed it, shapes only (no data read):
  the step (``step_fn``) and ``input_sharding`` of ``DeviceData`` or ``StreamData`` for
  ``config``, and ``example_input()`` as ``jax.ShapeDtypeStruct``s, so that a config's
  step compiles ahead of time for devices this machine does not have
  (``train.lower_train_step``; python -m emim.aot)."""

  iterator = None

  def __init__(self, config: ml_collections.ConfigDict, mesh, num_examples: int):
    """``num_examples``: the training set's size (a device-resident set's first dimension)."""
    self._mesh, self._batch_size, self.num_examples = mesh, config.train.batch_size, num_examples
    self.streamed = config.data.stream
    key = "vectors" if config.data.source in VECTOR_SOURCES else "images"
    shape, dtype = sources.input_shape(config.data), np.float32 if key == "vectors" else np.uint8
    if self.streamed:  # the host's two random resized crops of each image (StreamData)
      rows, shape = self._batch_size, (2,) + shape
      key = "views"
    else:  # the whole training set, replicated, a row per example (DeviceData)
      rows, shape = num_examples, (int(np.prod(shape)),)
    spec = self.input_sharding
    self._example = {key: jax.ShapeDtypeStruct((rows,) + shape, dtype, sharding=spec),
                     "labels": jax.ShapeDtypeStruct((rows,), np.int32, sharding=spec)}

  def step_fn(self, parts):
    return _streamed_step_fn(parts) if self.streamed else _device_step_fn(parts, self._mesh, self._batch_size)

  @property
  def input_sharding(self):
    return sharding.batch_sharding(self._mesh) if self.streamed else sharding.replicated(self._mesh)

  def example_input(self):
    return self._example


def make_train_data(config: ml_collections.ConfigDict, mesh, cache_dir: str):
  if config.data.stream:
    return StreamData(config.data, config.augment, mesh, config.seed, config.train.batch_size)
  train = sources.load(config.data, "train", cache_dir=cache_dir)
  load_test = lambda: sources.load(config.data, "test", cache_dir=cache_dir, train_classes=train.class_names)
  return DeviceData(train, mesh, config.train.batch_size, load_test)
