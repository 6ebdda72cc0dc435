"""The streaming (Grain) path: batches are a function of the step and of no process
count, labels number the training classes by name, and the evaluation program reads
streamed splits (a streamed run trained and resumed exactly: tests/test_imagenet.py)."""


import grain
import jax
import numpy as np
import pytest
from conftest import load_config
from PIL import Image

from emim import evaluate
from emim.backbone import features_and_labels
from emim.data import streaming
from emim.data.sources import DatasetError
from emim.evaluators.knn import knn_accuracy


class RecordAndBox(grain.transforms.RandomMap):
  """record -> (its index, a random number): which example, and what crop it drew."""

  def random_map(self, record, rng):
    return {"record": np.int32(record), "draw": np.float32(rng.uniform())}


def test_batches_depend_only_on_the_step(folder):
  records, classes = streaming.image_folder_records(str(folder), "train")
  assert len(records) == 64 and classes == ("c0", "c1", "c2", "c3")
  decode = streaming.TwoCropDecode(streaming._open_file, 16, ((0.2, 1.0), (0.2, 1.0)))
  from_start = streaming.make_stream(records, decode, 8, seed=3)
  batches = [next(from_start) for _ in range(12)]  # 1.5 epochs: crosses an epoch boundary
  assert batches[0]["views"].shape == (8, 2, 16, 16, 3) and batches[0]["views"].dtype == np.uint8
  assert not np.array_equal(batches[0]["views"][:, 0], batches[0]["views"][:, 1])  # two different crops
  resumed = streaming.make_stream(records, decode, 8, seed=3, start_step=5)
  for expected in batches[5:]:
    got = next(resumed)
    np.testing.assert_array_equal(got["views"], expected["views"])
    np.testing.assert_array_equal(got["labels"], expected["labels"])
  # Every example once per epoch, in a new order each epoch, with new crops.
  epoch0 = np.concatenate([b["labels"] for b in batches[:8]])
  np.testing.assert_array_equal(np.bincount(epoch0), [16] * 4)
  indexed = streaming.make_stream(range(64), RecordAndBox(), 8, seed=3)
  epochs = [[next(indexed) for _ in range(8)] for _ in range(2)]
  order = [np.concatenate([b["record"] for b in epoch]) for epoch in epochs]
  draws = [dict(zip(o, np.concatenate([b["draw"] for b in epoch]))) for o, epoch in zip(order, epochs)]
  assert sorted(order[0]) == sorted(order[1]) == list(range(64))
  assert not np.array_equal(order[0], order[1])
  assert all(draws[0][r] != draws[1][r] for r in range(64))  # an example's crop differs between epochs


class CountingDecode(grain.transforms.Map):
  """record -> record, counting the records decoded."""

  def __init__(self):
    self.calls = 0

  def map(self, record):
    self.calls += 1
    return {"record": np.int32(record)}


def test_the_stream_decodes_a_bounded_number_of_batches_ahead():
  """The stream holds at most read_ahead's few batches ahead of its consumer, however
  fast the host decodes: Grain's default would decode up to 500 batches ahead (150 GB of
  ImageNet's two-view crops at 1024 a batch)."""
  import time

  decode = CountingDecode()
  stream = streaming.make_stream(range(64), decode, 4, seed=0)
  next(stream)
  time.sleep(0.5)  # a fast host, a slow consumer
  in_flight = streaming.read_ahead(0).prefetch_buffer_size
  assert 4 <= decode.calls <= 4 * (in_flight + 1), decode.calls


def test_the_global_batches_do_not_depend_on_the_number_of_processes(monkeypatch):
  """Each process takes its rows of every global batch; the rows of two processes
  together are the one-process batch, crops included (a run can move to more hosts)."""
  decode = RecordAndBox()
  alone = streaming.make_stream(range(40), decode, 8, seed=7)
  single = [next(alone) for _ in range(7)]  # crosses an epoch boundary (5 batches each)
  halves = []
  for index in range(2):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    stream = streaming.make_stream(range(40), decode, 8, seed=7)
    halves.append([next(stream) for _ in range(7)])
  for whole, first, second in zip(single, *halves):
    for key in ("record", "draw"):
      np.testing.assert_array_equal(whole[key], np.concatenate([first[key], second[key]]))


def test_iterator_state_restores_the_stream_with_worker_processes(folder):
  """What the checkpoints save: with decoding worker processes, a fresh stream given a
  saved state continues exactly where the saved one stood."""
  records, _ = streaming.image_folder_records(str(folder), "train")
  decode = streaming.TwoCropDecode(streaming._open_file, 16, ((0.2, 1.0), (0.2, 1.0)))
  stream = streaming.make_stream(records, decode, 8, seed=5, workers=2)
  for _ in range(3):
    next(stream)
  state = stream.get_state()
  expected = [next(stream) for _ in range(3)]
  restored = streaming.make_stream(records, decode, 8, seed=5, workers=2)
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    np.testing.assert_array_equal(got["views"], want["views"])
    np.testing.assert_array_equal(got["labels"], want["labels"])


def test_host_crops_cover_the_full_image_and_centre_view_is_square(folder):
  records, _ = streaming.image_folder_records(str(folder), "train")
  wide = folder / "wide.png"
  image = np.zeros((10, 40, 3), np.uint8)
  image[:, :10] = 255  # only the left quarter is white: outside any centre square
  Image.fromarray(image).save(wide)
  centre = streaming.CentreDecode(streaming._open_file, 10).map((str(wide), 0))["images"]
  assert centre.shape == (10, 10, 3) and centre.max() == 0  # the centre square misses it
  crops = streaming.TwoCropDecode(streaming._open_file, 8, ((0.05, 0.3), (0.05, 0.3)))
  rng = np.random.default_rng(0)
  seen_white = any(crops.random_map((str(wide), 0), rng)["views"].max() > 200 for _ in range(40))
  assert seen_white  # host crops are drawn from the whole image
  wide.unlink()


def test_streaming_needs_a_directory(tmp_path):
  with pytest.raises(DatasetError, match="an archive must be unpacked"):
    streaming.image_folder_records(str(tmp_path / "archive.tar.gz"), "train")
  (tmp_path / "imagenet" / "train").mkdir(parents=True)
  (tmp_path / "imagenet" / "val").mkdir()
  with pytest.raises(DatasetError, match=r"has no split 'validation' \(it holds \['train', 'val'\]\).*test_split"):
    streaming.image_folder_records(str(tmp_path / "imagenet"), "validation")


def test_labels_number_the_training_classes_by_name(tmp_path):
  """A test split without some training class keeps the training numbering; a class only
  the test split has, or a class folder without images, is an error that names it."""
  for split, classes in (("train", ("ant", "bee", "cat")), ("test", ("bee", "cat"))):
    for c in classes:
      (tmp_path / split / c).mkdir(parents=True)
      Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / split / c / "0.png")
  _, train_classes = streaming.image_folder_records(str(tmp_path), "train")
  records, classes = streaming.image_folder_records(str(tmp_path), "test", train_classes)
  assert classes == ("ant", "bee", "cat") and [label for _, label in records] == [1, 2]
  (tmp_path / "test" / "dog").mkdir()
  with pytest.raises(DatasetError, match=r"holds no images.*add its images or remove the folder"):
    streaming.image_folder_records(str(tmp_path), "test", train_classes)
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "test" / "dog" / "0.png")
  with pytest.raises(DatasetError, match=r"classes the training split does not: \['dog'\]"):
    streaming.image_folder_records(str(tmp_path), "test", train_classes)


def test_the_streamed_probe_separates_classes_a_random_backbone_separates(folder, tmp_path):
  """The evaluation program on streamed splits (random resized crops of the full images
  on the host, flips on the device), with the untrained backbone: the four classes
  differ in mean intensity, which random features keep, so the probe is well above
  chance (25%) and kNN is what the features give, computed apart. (Training, resuming
  and evaluating a streamed run: tests/test_imagenet.py.)"""
  config = load_config("synthetic", "runlocal")
  with config.unlocked():
    config.data.source, config.data.path, config.data.stream, config.data.workers = "image_folder", str(folder), True, 0
    config.data.decode_size, config.data.num_classes = 16, 4
    config.eval.probe_epochs, config.eval.probe_batch_size, config.eval.probe_mode = 3, 16, "augmented"
  results = evaluate.evaluate(config, str(tmp_path), random_init=True)
  assert results["num_train"] == 64 and results["num_test"] == 16
  assert results["linear_top1"] >= 0.5, results
  from emim.backbone import init_backbone, model_config_of

  fn = init_backbone(model_config_of(config), config.seed).features_fn()
  (train_f, train_l), (test_f, test_l) = (features_and_labels(fn, streaming.stream_split(config.data, split), 16)
                                          for split in ("train", "test"))
  np.testing.assert_array_equal(test_l, np.repeat(np.arange(4), 4))  # test labels: the training classes' numbers
  expected = knn_accuracy(train_f, train_l, test_f, test_l, 4, tuple(config.eval.knn_k), config.eval.knn_temperature)
  assert results["knn_top1_k20"] == expected["knn_top1_k20"]
