"""Data sources: synthetic mixture, image folders (directory and .tar.gz) with their cache,
and clear errors for missing or corrupt data."""

import os
import tarfile

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from emim.data import image_folder as image_folder_lib
from emim.data import sources


def write_folder(root, split="train", classes=("cat", "dog"), per_class=3, size=8):
  rng = np.random.default_rng(0)
  for c in classes:
    (root / split / c).mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
      Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
  return root


def test_synthetic_is_deterministic_labelled_and_splits_share_classes():
  a = sources.synthetic(64, 16, 10, seed=0)
  b = sources.synthetic(64, 16, 10, seed=0)
  test = sources.synthetic(64, 16, 10, seed=1)
  np.testing.assert_array_equal(a.images, b.images)
  assert a.images.shape == (64, 16, 16, 3) and a.images.dtype == np.uint8
  assert a.labels.min() >= 0 and a.labels.max() < 10 and a.num_classes == 10
  assert not np.array_equal(a.images, test.images)
  # Same class, different split: closer on average than different classes.
  mean = lambda d, c: d.images[d.labels == c].astype(float).mean(0)
  assert np.abs(mean(a, 0) - mean(test, 0)).mean() < np.abs(mean(a, 0) - mean(test, 1)).mean()


def test_image_folder_directory_and_archive_decode_the_same(tmp_path):
  root = write_folder(tmp_path / "folder")
  from_dir = sources.image_folder(str(root), "train", None, cache_dir=None)
  archive = tmp_path / "folder.tar.gz"
  with tarfile.open(archive, "w:gz") as tar:
    tar.add(root / "train", arcname="train")
  from_tar = sources.image_folder(str(archive), "train", None, cache_dir=None)
  assert from_dir.class_names == from_tar.class_names == ("cat", "dog")
  np.testing.assert_array_equal(from_dir.images, from_tar.images)
  np.testing.assert_array_equal(from_dir.labels, [0, 0, 0, 1, 1, 1])
  expected = np.asarray(Image.open(root / "train" / "dog" / "0.png").convert("RGB"))
  np.testing.assert_array_equal(from_dir.images[3], expected)


def test_image_folder_resizes_to_decode_size(tmp_path):
  root = write_folder(tmp_path / "folder", size=12)
  data = sources.image_folder(str(root), "train", 6, cache_dir=None)
  assert data.images.shape == (6, 6, 6, 3)


def test_cache_makes_the_second_load_skip_decoding(tmp_path, monkeypatch):
  root = write_folder(tmp_path / "folder")
  first = sources.image_folder(str(root), "train", None, cache_dir=str(tmp_path / "cache"))
  assert len(list((tmp_path / "cache").glob("*.npz"))) == 1

  def no_decoding(*args, **kwargs):
    raise AssertionError("decoded again despite the cache")

  monkeypatch.setattr(image_folder_lib, "decode_image", no_decoding)
  second = sources.image_folder(str(root), "train", None, cache_dir=str(tmp_path / "cache"))
  np.testing.assert_array_equal(first.images, second.images)


def test_missing_and_corrupt_data_give_errors_that_name_the_fix(tmp_path):
  with pytest.raises(sources.DatasetError, match="does not exist.*config.data.path"):
    sources.image_folder(str(tmp_path / "nowhere"), "train", None, None)
  root = write_folder(tmp_path / "folder")
  with pytest.raises(sources.DatasetError, match="No split 'val'"):
    sources.image_folder(str(root), "val", None, None)
  (root / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
  with pytest.raises(sources.DatasetError, match="broken.jpg.*Remove or replace"):
    sources.image_folder(str(root), "train", None, None)


def test_shared_cifar10_archive_test_split(cifar_archive, tmp_path):
  data = sources.image_folder(str(cifar_archive), "test", None, cache_dir=str(tmp_path))
  assert data.images.shape == (10000, 32, 32, 3)
  assert data.class_names[0] == "airplane" and data.num_classes == 10
  np.testing.assert_array_equal(np.bincount(data.labels), [1000] * 10)


@pytest.mark.parametrize("name,shape", [("cifar10", (32, 32, 3)), ("mnist", (28, 28, 3))])
def test_tfds_source_reads_a_data_source_without_tensorflow(name, shape):
  tfds = pytest.importorskip("tensorflow_datasets")
  import ml_collections

  from emim.data import streaming

  cfg = ml_collections.ConfigDict(dict(source="tfds", tfds_name=name, tfds_data_dir="", train_split="train",
                                       test_split="test", decode_size=0, image_size=32, num_classes=10))
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    data = sources.load(cfg, "train")
    records, open_fn, _ = streaming.stream_source(cfg, "train")
    image, label, name = open_fn(records[0])
    image, _, _ = streaming._decode(image, 1.0, name)  # (records open lazily; decoding converts to RGB)
  assert data.images.shape == (6,) + shape and data.images.dtype == np.uint8
  assert data.labels.shape == (6,) and data.labels.dtype == np.int32
  assert image.mode == "RGB" and image.size == shape[:2] and 0 <= label < 10


def _tfrecord_only(tfds, monkeypatch):
  """tfds.data_source fails as it does on a dataset prepared as TFRecord (tfds.load's default)."""
  def no_array_record(name, **kwargs):
    raise NotImplementedError(f"{name} has no ArrayRecord files")
  monkeypatch.setattr(tfds, "data_source", no_array_record)


def test_tfds_dataset_not_in_array_record_is_read_with_tfds_load(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("tensorflow", reason="tfds.load reads through TensorFlow, an optional extra (pip install -e .[tf])")
  import ml_collections

  _tfrecord_only(tfds, monkeypatch)
  cfg = ml_collections.ConfigDict(dict(source="tfds", tfds_name="cifar10", tfds_data_dir="", train_split="train",
                                       test_split="test", decode_size=0))
  with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
    data = sources.load(cfg, "train")
  assert data.images.shape == (5, 32, 32, 3) and data.images.dtype == np.uint8 and data.labels.shape == (5,)


def test_tfds_dataset_not_in_array_record_without_tensorflow_names_both_fixes(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  import importlib.util

  import ml_collections

  _tfrecord_only(tfds, monkeypatch)
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorflow" else find_spec(name, *a))
  cfg = ml_collections.ConfigDict(dict(source="tfds", tfds_name="cifar10", tfds_data_dir="", train_split="train",
                                       test_split="test", decode_size=0))
  with pytest.raises(sources.DatasetError, match=r"(?s)not prepared as ArrayRecord.*file_format=array_record.*install TensorFlow"):
    sources.load(cfg, "train")


def test_unprepared_tfds_dataset_names_the_fix():
  pytest.importorskip("tensorflow_datasets")
  import ml_collections

  cfg = ml_collections.ConfigDict(dict(source="tfds", tfds_name="cifar10", tfds_data_dir="/nonexistent",
                                       train_split="train", test_split="test", decode_size=0))
  with pytest.raises(sources.DatasetError, match="(?s)not prepared.*tfds build"):
    sources.load(cfg, "train")


def test_labels_number_the_training_splits_classes_in_both_loaders(tmp_path):
  """A test split without some training class keeps the training numbering (it shifted
  before); a class only the test split has is an error; the streaming loader agrees."""
  from emim.data import streaming

  root = write_folder(tmp_path / "folder", "train", classes=("ant", "bee", "cat"))
  write_folder(root, "test", classes=("bee", "cat"))
  test = sources.image_folder(str(root), "test", None, None, train_classes=("ant", "bee", "cat"))
  assert test.class_names == ("ant", "bee", "cat")
  np.testing.assert_array_equal(test.labels, [1, 1, 1, 2, 2, 2])
  cfg = _folder_config(root)
  np.testing.assert_array_equal(sources.load(cfg, "test").labels, test.labels)  # lists train's classes itself
  records, classes = streaming.stream_source(cfg, "test")[::2]
  assert classes == test.class_names and [label for _, label in records] == list(test.labels)
  write_folder(root, "test", classes=("dog",))
  with pytest.raises(sources.DatasetError, match=r"classes the training split does not: \['dog'\]"):
    sources.load(cfg, "test")


def _folder_config(root):
  import ml_collections

  return ml_collections.ConfigDict(dict(source="image_folder", path=str(root), train_split="train", test_split="test",
                                        decode_size=0, cache_dir="", image_size=8))


def test_a_class_folder_without_images_is_an_error_naming_it(tmp_path):
  root = write_folder(tmp_path / "folder")
  (root / "train" / "empty_class").mkdir()
  with pytest.raises(sources.DatasetError, match=r"empty_class holds no images.*remove the folder"):
    sources.image_folder(str(root), "train", None, None)
  archive = tmp_path / "folder.tar.gz"
  with tarfile.open(archive, "w:gz") as tar:
    tar.add(root / "train", arcname="train")
  with pytest.raises(sources.DatasetError, match=r"\['empty_class'\] of split 'train'.*hold no images"):
    sources.image_folder(str(archive), "train", None, None)


def test_any_change_to_the_images_decodes_again_and_cache_names_stay_short(tmp_path):
  root = write_folder(tmp_path / ("x" * 240))  # a long folder name: the cache's file name stays short
  cache = tmp_path / "cache"
  first = sources.image_folder(str(root), "train", None, cache_dir=str(cache))
  assert len(first) == 6 and all(len(p.name) < 100 for p in cache.iterdir())
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / "cat" / "new.png")  # added inside a class
  second = sources.image_folder(str(root), "train", None, cache_dir=str(cache))
  assert len(second) == 7
  (root / "train" / "cat" / "new.png").unlink()
  Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(root / "train" / "dog" / "0.png")  # replaced
  third = sources.image_folder(str(root), "train", None, cache_dir=str(cache))
  assert len(third) == 6 and third.images[3].min() == 255
  assert len(list(cache.iterdir())) == 1  # each decode replaced the one it superseded


def test_the_cache_command_lists_and_clears_only_emims_cache_files(tmp_path):
  """python -m emim.cache: the sizes of a decode cache; --clear removes emim's cache files
  and nothing else (a run's files, a dataset, a home directory given by mistake)."""
  import subprocess
  import sys

  cache = tmp_path / ".emim_cache"
  write_folder(write_folder(tmp_path / "folder"), "test")
  for split in ("train", "test"):
    sources.image_folder(str(tmp_path / "folder"), split, None, cache_dir=str(cache))
  size = sum(p.stat().st_size for p in cache.iterdir())
  run = lambda *args: subprocess.run([sys.executable, "-m", "emim.cache", *args], capture_output=True, text=True,
                                     cwd=REPO)
  listed = run(f"--workdir={tmp_path / 'run'}")  # the cache its runs share, beside it
  assert listed.returncode == 0, listed.stderr
  assert listed.stdout.startswith(f"{cache}: 2 cache file(s), {size / 2**20:.1f} MiB") and "folder-train-" in listed.stdout
  (cache / "notes.txt").write_text("mine")  # not emim's
  (cache / "folder-train-0123456789abcdef.npz").write_bytes(b"")  # a decode named as before its prefix had a hash
  (cache / next(cache.glob("folder-train-*")).name.replace(".npz", ".4242.tmp.npz")).write_bytes(b"")  # a dead writer's
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "metrics.jsonl").write_text("{}")
  mistaken = run(f"--dir={tmp_path}", "--clear")  # the folder above: a dataset, a run, the cache
  assert mistaken.returncode == 0 and "file(s) that are not emim's caches left as they are" in mistaken.stdout
  assert (tmp_path / "run" / "metrics.jsonl").exists() and (tmp_path / "folder" / "train" / "cat" / "0.png").exists()
  assert sorted(p.name for p in cache.iterdir()) == ["notes.txt"]  # the decodes gone, the rest kept
  assert "no such folder" in run(f"--dir={tmp_path / 'nowhere'}", "--clear").stdout



def test_truncated_archive_and_mixed_sizes_name_the_file_and_the_fix(tmp_path):
  root = write_folder(tmp_path / "folder", per_class=20)
  archive = tmp_path / "folder.tar.gz"
  with tarfile.open(archive, "w:gz") as tar:
    tar.add(root / "train", arcname="train")
  data = archive.read_bytes()
  archive.write_bytes(data[: len(data) // 2])
  with pytest.raises(sources.DatasetError, match=rf"Cannot read the archive {archive} .*truncated or corrupt"):
    sources.image_folder(str(archive), "train", None, None)
  Image.fromarray(np.zeros((12, 10, 3), np.uint8)).save(root / "train" / "cat" / "odd.png")
  with pytest.raises(sources.DatasetError, match=r"different sizes \(8x8, 12x10\).*--config.data.decode_size=N"):
    sources.image_folder(str(root), "train", None, None)


def test_tfds_class_names_come_from_its_dataset_info():
  tfds = pytest.importorskip("tensorflow_datasets")
  import ml_collections

  # beans names its classes in code (CIFAR-10's names come with its prepared files).
  cfg = ml_collections.ConfigDict(dict(source="tfds", tfds_name="beans", tfds_data_dir="", train_split="train",
                                       test_split="test", decode_size=32, image_size=32, num_classes=7))
  with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
    data = sources.load(cfg, "train")
  assert data.class_names == ("angular_leaf_spot", "bean_rust", "healthy") and data.num_classes == 3


def test_a_cache_that_cannot_be_written_costs_a_warning_not_the_run(tmp_path, caplog):
  root = write_folder(tmp_path / "folder")
  (tmp_path / "not_a_dir").write_text("")
  data = sources.image_folder(str(root), "train", None, cache_dir=str(tmp_path / "not_a_dir" / "cache"))
  assert len(data) == 6 and "Cannot write the decode cache" in caplog.text


def test_a_script_without_a_main_guard_is_told_how_to_decode_with_processes(tmp_path):
  """More than 1,000 images are decoded in spawned processes, each of which imports the
  calling script again: one that loads data at its top level used to die with
  BrokenProcessPool. It is told to add the main guard, and the guarded script decodes (as
  does the unguarded one decoding in its own process, ``workers=1``)."""
  import subprocess
  import sys

  root = write_folder(tmp_path / "folder", classes=("a", "b"), per_class=501, size=4)  # 1,002 images
  load = f"from emim.data import sources\nprint(len(sources.image_folder({str(root)!r}, 'train', None, None, workers=2)))\n"

  def run(code):
    (tmp_path / "script.py").write_text(code)
    return subprocess.run([sys.executable, tmp_path / "script.py"], capture_output=True, text=True, cwd=tmp_path)

  unguarded = run(load)
  assert unguarded.returncode != 0
  assert "put the code that calls emim under `if __name__ == \"__main__\":`" in unguarded.stderr, unguarded.stderr[-2000:]
  guarded = run("if __name__ == '__main__':\n" + "".join("  " + line + "\n" for line in load.splitlines()))
  assert guarded.returncode == 0 and guarded.stdout.split() == ["1002"], guarded.stderr[-2000:]
  one_process = run(load.replace("workers=2", "workers=1"))
  assert one_process.returncode == 0 and one_process.stdout.split() == ["1002"], one_process.stderr[-2000:]
  # The config's knob reaches the decode: config.data.workers=1 decodes in the script's
  # own process (with 2 it spawns, and the unguarded script is told both fixes).
  by_config = ("from emim.config_base import base_config\nfrom emim.data import sources\nc = base_config().data\n"
               f"c.source, c.path, c.workers = 'image_folder', {str(root)!r}, WORKERS\n"
               "print(len(sources.load(c, 'train')))\n")
  if len(os.sched_getaffinity(0)) > 1:  # one core: 2 workers are bounded to 1, and nothing spawns
    assert "or decode in this one process: config.data.workers=1" in run(by_config.replace("WORKERS", "2")).stderr
  one_by_config = run(by_config.replace("WORKERS", "1"))
  assert one_by_config.returncode == 0 and one_by_config.stdout.split() == ["1002"], one_by_config.stderr[-2000:]
