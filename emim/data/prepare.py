"""Prepare CIFAR-10 or CIFAR-100 as an image folder, from the official archives, without
TensorFlow:

    python -m emim.data.prepare cifar10                 # downloads cifar-10-python.tar.gz (163 MB)
    python -m emim.data.prepare cifar100 --from=cifar-100-python.tar.gz --to=/data/cifar100

The official archives (https://www.cs.toronto.edu/~kriz/cifar.html) hold the images as
pickled numpy batches: ``data`` a uint8 array (N, 3072), each row a 32x32 image's red,
green then blue plane, each row-major; ``labels`` (CIFAR-10) or ``fine_labels``
(CIFAR-100); the class names in ``batches.meta`` / ``meta``. They are written out as
``DIR/{train,test}/<class>/<index>.png``: lossless, so the pixels emim reads are the
archive's own (the index is the image's position in the official split). The configs
read this folder by default (``configs/cifar10.py``: ``~/emim_data/cifar10``).

Written to a temporary folder beside ``DIR`` and renamed when complete: an interrupted
preparation leaves no half dataset. A folder already prepared is left as it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pathlib
import pickle
import shlex
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request

import numpy as np
from PIL import Image

from emim.data.dataset import DatasetError


@dataclasses.dataclass(frozen=True)
class Archive:
  """One official CIFAR archive: where it is, its MD5, and its members."""

  url: str
  md5: str
  size_mb: int
  splits: dict[str, tuple[str, ...]]  # split -> its batch files, in order
  meta: str  # the file of the class names
  names_key: str  # their key in it
  labels_key: str  # the labels' key in a batch
  default_dir: str  # where the configs read it (config.data.path)


DATASETS = {
    "cifar10": Archive(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a",
        size_mb=163, splits={"train": tuple(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)),
                             "test": ("cifar-10-batches-py/test_batch",)},
        meta="cifar-10-batches-py/batches.meta", names_key="label_names", labels_key="labels",
        default_dir="~/emim_data/cifar10"),
    "cifar100": Archive(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", md5="eb9058c3a382ffc7106e4002c42a8d85",
        size_mb=161, splits={"train": ("cifar-100-python/train",), "test": ("cifar-100-python/test",)},
        meta="cifar-100-python/meta", names_key="fine_label_names", labels_key="fine_labels",
        default_dir="~/emim_data/cifar100"),
}
MARKER = "emim_prepared.json"  # written last: a folder with it is complete


def prepare_command(name: str, to: str | None = None) -> str:
  """The command that prepares dataset ``name`` (into ``to`` when it is not the default)."""
  default = DATASETS[name].default_dir
  where = "" if to is None or os.path.expanduser(to) == os.path.expanduser(default) else f" --to={to}"
  return f"python -m emim.data.prepare {name}{where}"


def check_image_folder(data_cfg) -> None:
  """Raise a ``DatasetError`` naming the command that prepares the data when
  ``config.data.path`` does not exist (``config.data.tfds_name`` names the dataset: the
  CIFAR configs' data can be prepared by ``prepare_command``)."""
  path = str(data_cfg.path)
  if not path:
    raise DatasetError("config.data.path is empty: point --config.data.path at an image folder (a directory or "
                       ".tar.gz laid out as split/class/*.jpg).")
  if "://" in path or pathlib.Path(path).expanduser().exists():
    return
  name = data_cfg.get("tfds_name", "")
  if name in DATASETS:
    raise DatasetError(
        f"No {name} data at {path}: prepare it with `{prepare_command(name, path)}` (downloads the official archive, "
        f"{DATASETS[name].size_mb} MB; --from=FILE converts one already downloaded), or point --config.data.path at "
        "your own copy as an image folder.")
  raise DatasetError(f"The image folder {path} does not exist. Point --config.data.path at a directory or .tar.gz "
                     "laid out as split/class/*.jpg (CIFAR-10 and CIFAR-100: python -m emim.data.prepare cifar10 "
                     "writes one).")


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickles the batches' dicts, lists and numpy arrays and nothing else: a pickle can
  run any code it names, and an archive given with --from may come from anywhere."""

  _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
              ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
              ("numpy._core.multiarray", "scalar"),
              ("_codecs", "encode")}  # how a Python 3 pickle of protocol 2 writes bytes

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise DatasetError(f"The CIFAR archive's pickle names {module}.{name}, which an official batch never does: it "
                         "is not the official archive. Download it again.")
    return super().find_class(module, name)


def _unpickle(data: bytes) -> dict:
  batch = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
  return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def read_archive(name: str, archive: str | os.PathLike) -> tuple[tuple[str, ...], dict[str, tuple[np.ndarray, np.ndarray]]]:
  """(class names, {split: (uint8 images (N, 32, 32, 3), int labels (N,))}) of an official
  CIFAR archive, the images in the archive's order."""
  spec = DATASETS[name]
  try:
    with tarfile.open(archive, "r:*") as tar:
      members = {m.name: m for m in tar.getmembers() if m.isfile()}
      read = lambda member: _unpickle(tar.extractfile(members[member]).read())
      missing = [m for m in (spec.meta, *sum(spec.splits.values(), ())) if m not in members]
      if missing:
        raise DatasetError(f"{archive} is not the official {name} archive (no {missing[0]} in it): give "
                           f"{pathlib.PurePosixPath(spec.url).name} from {spec.url}.")
      names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in read(spec.meta)[spec.names_key])
      splits = {}
      for split, files in spec.splits.items():
        batches = [read(f) for f in files]
        for f, b in zip(files, batches):  # a label per image, each naming a class of the meta file
          count, found = len(b["data"]), np.asarray(b[spec.labels_key], np.int64)
          if len(found) != count or (count and (found.min() < 0 or found.max() >= len(names))):
            raise DatasetError(f"{archive}: {f} has {count} images and {len(found)} labels"
                               + (f" from {found.min()} to {found.max()}" if len(found) else "")
                               + f" (an official batch has one label per image, each below {len(names)}): it is "
                               f"not the official {name} archive. Download it again from {spec.url}.")
        data = np.concatenate([np.asarray(b["data"], np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[spec.labels_key], np.int64) for b in batches])
        # Each row: the red plane, then green, then blue, each 32x32 row-major.
        splits[split] = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels
  except DatasetError:
    raise
  except (tarfile.TarError, EOFError, OSError, pickle.UnpicklingError, KeyError, ValueError) as e:
    raise DatasetError(f"Cannot read {archive} as the official {name} archive ({type(e).__name__}: {e}): it is "
                       f"truncated or not that archive. Download it again from {spec.url}.") from e
  return names, splits


def write_image_folder(names: tuple[str, ...], splits: dict[str, tuple[np.ndarray, np.ndarray]],
                       to: pathlib.Path) -> None:
  """Write ``to/<split>/<class>/<index>.png`` (index: the position in the split)."""
  for split, (images, labels) in splits.items():
    for cls in sorted({names[label] for label in labels}):
      (to / split / cls).mkdir(parents=True)
    for i, (image, label) in enumerate(zip(images, labels)):
      Image.fromarray(image).save(to / split / names[label] / f"{i:05d}.png", compress_level=1)


def download(name: str, directory: pathlib.Path, to: str | None = None) -> pathlib.Path:
  """The official archive of ``name``, downloaded into ``directory`` and its MD5 checked
  (``to``: the folder being prepared, for the command an error repeats)."""
  spec = DATASETS[name]
  target = directory / pathlib.PurePosixPath(spec.url).name
  print(f"Downloading {spec.url} ({spec.size_mb} MB) ...", file=sys.stderr, flush=True)
  try:
    with urllib.request.urlopen(spec.url, timeout=60) as response, open(target, "wb") as out:
      shutil.copyfileobj(response, out, 1 << 20)
  except (urllib.error.URLError, OSError) as e:
    reason = getattr(e, "reason", e)
    raise DatasetError(f"Cannot download {spec.url} ({reason}). Without internet here, download it elsewhere and "
                       f"run: {prepare_command(name, to)} --from=PATH/{target.name}") from e
  md5 = hashlib.md5(target.read_bytes()).hexdigest()
  if md5 != spec.md5:
    raise DatasetError(f"The download of {spec.url} has MD5 {md5}, not the official {spec.md5}: it is incomplete or "
                       "altered. Run the command again.")
  return target


def prepare(name: str, to: str | os.PathLike | None = None, archive: str | os.PathLike | None = None) -> pathlib.Path:
  """Prepare dataset ``name`` as an image folder at ``to`` (default: where its config
  reads it), from ``archive`` (default: downloaded). Returns the folder."""
  if name not in DATASETS:
    raise DatasetError(f"Unknown dataset {name!r}: this prepares {', '.join(DATASETS)}.")
  spec = DATASETS[name]
  if "://" in str(to or ""):
    raise DatasetError(f"--to={to}: this writes a local folder; prepare it here, then copy it to the bucket "
                       "(gcloud storage cp -r DIR gs://...), or train from TFDS there (docs/getting-data.md).")
  to = pathlib.Path(to or spec.default_dir).expanduser()
  if (to / MARKER).exists():
    try:
      held = json.loads((to / MARKER).read_text()).get("dataset")
    except (OSError, ValueError, AttributeError):
      held = None
    if held != name:
      raise DatasetError(f"{to} holds {held or 'an unreadable marker'}, prepared by emim, not {name}: give another "
                         "--to.")
    print(f"{to} already holds {name} (prepared by emim); nothing to do.", file=sys.stderr)
    return to
  for stale in to.parent.glob(f".{to.name}.partial-*") if to.parent.is_dir() else ():
    # What a preparation killed before its end left (SIGTERM, a machine gone): never used.
    shutil.rmtree(stale, ignore_errors=True)
  if to.exists() and (not to.is_dir() or any(to.iterdir())):
    raise DatasetError(f"{to} exists and is not a {name} folder prepared by emim: give another --to, or remove it.")
  to.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix=f".{to.name}.partial-", dir=to.parent) as tmp:
    tmp = pathlib.Path(tmp)
    if archive is None:
      archive = download(name, tmp, str(to))
    elif not pathlib.Path(archive).expanduser().is_file():
      raise DatasetError(f"--from={archive} is not a file: give the official {pathlib.PurePosixPath(spec.url).name} "
                         f"(from {spec.url}), or leave --from out to download it.")
    names, splits = read_archive(name, pathlib.Path(archive).expanduser())
    print(f"Writing {sum(len(l) for _, l in splits.values())} images of {name} to {to} ...", file=sys.stderr,
          flush=True)
    folder = tmp / "folder"
    write_image_folder(names, splits, folder)
    counts = {split: len(labels) for split, (_, labels) in splits.items()}
    (folder / MARKER).write_text(json.dumps(dict(dataset=name, classes=names, images=counts), indent=2))
    if to.exists():
      to.rmdir()  # empty (checked above)
    os.replace(folder, to)
  return to


if __name__ == "__main__":
  from absl import app, flags

  from emim import cli

  _FROM = flags.DEFINE_string("from", None, "The official archive, already downloaded (default: download it).")
  _TO = flags.DEFINE_string("to", None, "The image folder to write (default: where the config reads it, "
                            + ", ".join(f"{k}: {v.default_dir}" for k, v in DATASETS.items()) + ").")

  def main(argv):
    if len(argv) != 2:
      raise DatasetError(f"Name one dataset: python -m emim.data.prepare {{{','.join(DATASETS)}}} [--from=ARCHIVE] "
                         "[--to=DIR].")
    name = argv[1]
    to = prepare(name, _TO.value, _FROM.value)
    config = f"configs/{name}.py"
    where = "" if _TO.value is None else f" --config.data.path={shlex.quote(str(to))}"
    print(f"{name} is ready in {to}. From the repository's root, try it on a CPU in a minute or so: python -m "
          f"emim.main --config={config}:runlocal{where} --workdir=/tmp/{name}_tiny; the full run (an accelerator): "
          f"python -m emim.main --config={config}{where} --workdir=runs/{name}")

  cli.run(main)
