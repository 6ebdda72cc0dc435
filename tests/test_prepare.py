"""python -m emim.data.prepare: the official CIFAR archives (pickled numpy batches) to an
image folder, checked on tiny archives written here in the official format; no network."""

import io
import os
import pathlib
import pickle
import subprocess
import sys
import tarfile
import urllib.error

import numpy as np
import pytest
from conftest import REPO, load_config

from emim.data import prepare, sources


def _add(tar: tarfile.TarFile, name: str, value) -> None:
  data = pickle.dumps(value, protocol=2)
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _rows(images: np.ndarray) -> np.ndarray:
  """The official layout, written out plane by plane: each row the red plane, then the
  green, then the blue, each 32x32 row-major."""
  return np.stack([np.concatenate([im[:, :, 0].ravel(), im[:, :, 1].ravel(), im[:, :, 2].ravel()]) for im in images])


def fake_archive(path: pathlib.Path, name: str, rng: np.random.Generator):
  """A tiny archive laid out as the official one of ``name`` (keys as bytes, as the
  official Python 2 pickles load); returns (class names, {split: (images, labels)})."""
  spec = prepare.DATASETS[name]
  names = [f"class_{c}" for c in range(4)]
  truth = {}
  with tarfile.open(path, "w:gz") as tar:
    _add(tar, spec.meta, {spec.names_key.encode(): [n.encode() for n in names]})
    for split, files in spec.splits.items():
      images, labels = [], []
      for f in files:
        n = (4 if len(files) > 1 else 9) if split == "train" else 5
        batch_images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        batch_labels = [int(x) % len(names) for x in rng.permutation(n)]  # every class in every split
        _add(tar, f, {b"batch_label": b"fake", b"data": _rows(batch_images), spec.labels_key.encode(): batch_labels,
                      b"filenames": [f"{i}.png".encode() for i in range(n)]})
        images.append(batch_images)
        labels += batch_labels
      truth[split] = np.concatenate(images), np.array(labels)
  return names, truth


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_the_official_archive_becomes_an_image_folder_of_its_exact_pixels(tmp_path, name):
  names, truth = fake_archive(tmp_path / "archive.tar.gz", name, np.random.default_rng(0))
  to = prepare.prepare(name, tmp_path / "out", tmp_path / "archive.tar.gz")
  assert to == tmp_path / "out" and not list(tmp_path.glob(".out.partial-*"))
  data_cfg = load_config(name, "runlocal").data
  with data_cfg.unlocked():
    data_cfg.path, data_cfg.cache_dir = str(to), ""
  train = sources.load(data_cfg, "train")
  test = sources.load(data_cfg, "test", train_classes=train.class_names)
  for split, loaded in (("train", train), ("test", test)):
    images, labels = truth[split]
    # Written in the archive's order (file names are the positions in the split), so
    # emim's reader, which sorts by class then name, gives them back class by class.
    order = np.argsort(labels, kind="stable")
    np.testing.assert_array_equal(loaded.images, images[order])
    assert [loaded.class_names[i] for i in loaded.labels] == [names[i] for i in labels[order]]


def test_the_configs_read_where_prepare_writes_and_missing_data_names_the_command(tmp_path):
  for name in prepare.DATASETS:
    config = load_config(name, None)
    assert config.data.source == "image_folder" and config.data.path == prepare.DATASETS[name].default_dir
  data_cfg = load_config("cifar10", "runlocal").data
  if not pathlib.Path(data_cfg.path).expanduser().exists():  # (where it is prepared, the default is not missing)
    with pytest.raises(sources.DatasetError, match=r"No cifar10 data at ~/emim_data/cifar10: prepare it with `python "
                       r"-m emim\.data\.prepare cifar10` \(downloads the official archive, 163 MB"):
      sources.load(data_cfg, "train")
  with data_cfg.unlocked():
    data_cfg.path = str(tmp_path / "c10")
  with pytest.raises(sources.DatasetError, match=rf"`python -m emim\.data\.prepare cifar10 --to={tmp_path}/c10`"):
    sources.load(data_cfg, "test")


def test_offline_download_bad_archive_and_foreign_folder_are_one_line_fixes(tmp_path, monkeypatch):
  def offline(*args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

  monkeypatch.setattr(prepare.urllib.request, "urlopen", offline)
  with pytest.raises(prepare.DatasetError, match=r"Cannot download https://www\.cs\.toronto\.edu/~kriz/"
                     r"cifar-10-python\.tar\.gz \(.*name resolution\)\. Without internet here, download it elsewhere "
                     rf"and run: python -m emim\.data\.prepare cifar10 --to={tmp_path}/out --from=PATH/cifar-10-python\.tar\.gz"):
    prepare.prepare("cifar10", tmp_path / "out")
  assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())  # nothing half written

  (tmp_path / "evil.tar.gz").write_bytes(b"")
  with tarfile.open(tmp_path / "evil.tar.gz", "w:gz") as tar:  # a pickle that would run a command
    for member in ["cifar-10-batches-py/batches.meta", *sum(prepare.DATASETS["cifar10"].splits.values(), ())]:
      _add(tar, member, {"x": os.system})
  with pytest.raises(prepare.DatasetError, match="names posix.system.*not the official archive"):
    prepare.prepare("cifar10", tmp_path / "out", tmp_path / "evil.tar.gz")
  fake_archive(tmp_path / "c100.tar.gz", "cifar100", np.random.default_rng(1))
  with pytest.raises(prepare.DatasetError, match="is not the official cifar10 archive .*cifar-10-python.tar.gz"):
    prepare.prepare("cifar10", tmp_path / "out", tmp_path / "c100.tar.gz")
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("mine")
  with pytest.raises(prepare.DatasetError, match="exists and is not a cifar100 folder prepared by emim"):
    prepare.prepare("cifar100", tmp_path / "mine", tmp_path / "c100.tar.gz")
  assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_the_command_prepares_once_and_says_how_to_train(tmp_path):
  fake_archive(tmp_path / "c10.tar.gz", "cifar10", np.random.default_rng(2))
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "emim.data.prepare", "cifar10", f"--from={tmp_path}/c10.tar.gz", f"--to={tmp_path}/d"]
  first = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
  assert first.returncode == 0, first.stderr
  assert first.stdout.strip() == (
      f"cifar10 is ready in {tmp_path}/d. From the repository's root, try it on a CPU in a minute or so: python -m "
      f"emim.main --config=configs/cifar10.py:runlocal --config.data.path={tmp_path}/d --workdir=/tmp/cifar10_tiny; "
      f"the full run (an accelerator): python -m emim.main --config=configs/cifar10.py --config.data.path={tmp_path}/d "
      "--workdir=runs/cifar10")
  assert len(list((tmp_path / "d" / "train").rglob("*.png"))) == 20
  again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
  assert again.returncode == 0 and "already holds cifar10 (prepared by emim); nothing to do" in again.stderr
  wrong = subprocess.run([*cmd[:3], "cifar1000"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
  assert wrong.returncode == 1 and wrong.stderr.strip() == ("error: Unknown dataset 'cifar1000': this prepares "
                                                            "cifar10, cifar100.")


def test_archives_whose_labels_do_not_fit_and_folders_of_another_dataset_are_refused(tmp_path):
  spec = prepare.DATASETS["cifar10"]
  rng = np.random.default_rng(3)

  def archive(path, labels_of):  # labels_of(batch index, image count) -> that batch's labels
    with tarfile.open(path, "w:gz") as tar:
      _add(tar, spec.meta, {spec.names_key.encode(): [f"c{c}".encode() for c in range(10)]})
      for i, f in enumerate(sum(spec.splits.values(), ())):
        _add(tar, f, {b"data": _rows(rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)),
                      spec.labels_key.encode(): labels_of(i, 3)})

  archive(tmp_path / "short.tar.gz", lambda i, n: [0] * (n - 1 if i == 0 else n))  # zip would shift every label
  with pytest.raises(prepare.DatasetError, match="data_batch_1 has 3 images and 2 labels"):
    prepare.prepare("cifar10", tmp_path / "a", tmp_path / "short.tar.gz")
  archive(tmp_path / "range.tar.gz", lambda i, n: [10] * n)
  with pytest.raises(prepare.DatasetError, match="labels from 10 to 10 .*each below 10"):
    prepare.prepare("cifar10", tmp_path / "a", tmp_path / "range.tar.gz")
  assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a.partial-*"))
  # A preparation killed by SIGTERM leaves its temporary folder: the next one removes it.
  (tmp_path / ".a.partial-killed" / "folder").mkdir(parents=True)
  archive(tmp_path / "good.tar.gz", lambda i, n: list(range(n)))
  prepare.prepare("cifar10", tmp_path / "a", tmp_path / "good.tar.gz")
  assert not list(tmp_path.glob(".a.partial-*"))
  with pytest.raises(prepare.DatasetError, match="holds cifar10, prepared by emim, not cifar100"):
    prepare.prepare("cifar100", tmp_path / "a", tmp_path / "good.tar.gz")


def test_a_bucket_as_the_destination_is_one_line_not_a_local_folder_named_gs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(prepare.DatasetError, match="--to=gs://bucket/c10: this writes a local folder"):
    prepare.prepare("cifar10", "gs://bucket/c10", tmp_path / "none.tar.gz")
  assert not (tmp_path / "gs:").exists()
