"""The image folder: split/class/*.jpg in a directory or a .tar.gz, decoded once, in
parallel, into a uint8 cache so that later runs start at once.

A cache file is named by the folder, the split and two hashes: one of what it is a decode
of (the folder's path, the split, the decode size, the class subset) and one of the
images' names, sizes and times. A change to the images decodes again, and the new cache
replaces the decodes of the same folder and split that it supersedes; ``python -m
emim.cache`` lists a cache folder and clears it.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import hashlib
import io
import json
import logging
import multiprocessing
import os
import pathlib
import re
import tarfile
import time
import zlib

import numpy as np
from PIL import Image

from emim import fs
from emim.data.dataset import DatasetError, ImageDataset
from emim.data.labels import check_subset_present, label_index

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def decode_image(item: tuple[str, bytes], size: int | None) -> np.ndarray:
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
    check_subset_present({p.name for p in folders}, subset, split, root)
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
    check_subset_present(seen | class_dirs, subset, split, path)
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


def _cache_prefix(path: pathlib.Path, split: str, size: int | None, subset=None) -> str:
  """The name every decode of one folder's split (at one size, of one subset) starts
  with, whatever its images are now: the folder's name cut to 40 characters, the split's
  to 20 (a file name has at most 255 bytes) and a hash of the four."""
  safe = lambda text, n: "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)[:n]
  ident = hashlib.sha1(f"{path.resolve()}|{split}|{size}|{subset}".encode()).hexdigest()[:8]
  return f"{safe(path.name, 40)}-{safe(split, 20)}-{ident}"


# A decode's file name, <prefix>-<key>.npz, and its writer's temporary file's,
# <prefix>-<key>.<pid>.tmp.npz (``_cache_prefix``, ``_cache_key``); python -m emim.cache
# recognises emim's files by it too, those of emim before the prefix had its hash
# (<folder>-<split>-<key>.npz) included.
DECODE_FILE = re.compile(r"(?P<prefix>.+-.+)-(?P<key>[0-9a-f]{16})(?:\.(?P<pid>\d+)\.tmp)?\.npz")


def _cache_file(prefix: str, key: str) -> str:
  return f"{prefix}-{key}.npz"


def _is_cache_of(name: str, prefix: str) -> bool:
  """Whether ``name`` is a finished cache file of ``prefix`` (not another process's
  temporary file)."""
  m = DECODE_FILE.fullmatch(name)
  return bool(m) and m["prefix"] == prefix and m["pid"] is None


def _prune_superseded(cache: pathlib.Path, prefix: str, started: float) -> None:
  """Remove the decodes of the same folder's split that ``cache`` supersedes, those
  written before this decode ``started`` (a decode of newer images that finished while
  this slower one ran is not superseded by it), and the temporary files of writers that
  died."""
  for other in cache.parent.glob(f"{prefix}-*"):
    try:
      if other != cache and _is_cache_of(other.name, prefix) and other.stat().st_mtime < started:
        other.unlink(missing_ok=True)
        logging.info("Removed %s: a decode of an earlier version of the same images.", other)
      elif other.name.endswith(".tmp.npz") and not fs.pid_alive(_writer_pid(other.name)):
        other.unlink(missing_ok=True)
    except FileNotFoundError:  # removed meanwhile by another run sharing the cache
      pass


def _writer_pid(tmp_name: str) -> int:
  """The pid in a temporary cache file's name (``<cache>.<pid>.tmp.npz``); 0 if none."""
  m = DECODE_FILE.fullmatch(tmp_name)
  return int(m["pid"]) if m and m["pid"] else 0


def cache_summary(cache_dir: str | os.PathLike) -> str:
  """One line on a decode cache folder: its files and size, and how to list or clear it."""
  files = [p for p in pathlib.Path(cache_dir).glob("*.npz") if p.is_file()]
  size = sum(p.stat().st_size for p in files)
  return (f"the decode cache {cache_dir} holds {len(files)} file(s), {size / 2**20:.1f} MiB (python -m emim.cache "
          f"--dir={cache_dir} lists them; add --clear to remove them)")


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
        "laid out as split/class/*.jpg (CIFAR-10 and CIFAR-100: python -m emim.data.prepare cifar10 writes one).")
  cache, dataset = None, None
  if cache_dir:
    prefix = _cache_prefix(src, split, image_size, subset)
    cache = pathlib.Path(cache_dir) / _cache_file(prefix, _cache_key(src, split, image_size, subset))
    if cache.exists():
      try:
        with np.load(cache) as f:
          dataset = ImageDataset(f["images"], f["labels"], tuple(json.loads(str(f["classes"]))))
      except Exception as e:  # a torn or corrupt cache file: decode again
        logging.warning("Ignoring unreadable cache %s (%s); decoding again.", cache, e)
  if dataset is None:
    started = time.time()
    dataset = _decode_split(src, split, image_size, workers, subset)
    if cache is not None and _write_cache(cache, dataset):
      _prune_superseded(cache, prefix, started)
      logging.info("Decoded %s/%s once: %s.", src, split, cache_summary(cache_dir))
  if train_classes is None or tuple(train_classes) == dataset.class_names:
    return dataset
  # Cached with this split's own class numbering; relabel by the training split's names.
  index = label_index(dataset.class_names, tuple(train_classes), split, src)
  relabel = np.array([index[c] for c in dataset.class_names], np.int32)
  return ImageDataset(dataset.images, relabel[dataset.labels], tuple(train_classes))


def _write_cache(cache: pathlib.Path, dataset: ImageDataset) -> bool:
  """Keep the decoded split for the next run; a cache that cannot be written (a read-only
  folder, a full disk) costs the next run a decode, not this one its work. Returns
  whether it was written."""
  # A temporary name of this process's own (runs started together share the cache and
  # decode at once), then an atomic rename: a crash never leaves a half-written cache.
  tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
  try:
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(tmp, images=dataset.images, labels=dataset.labels, classes=json.dumps(dataset.class_names))
    os.replace(tmp, cache)
    return True
  except OSError as e:
    logging.warning("Cannot write the decode cache %s (%s); continuing without it. Set --config.data.cache_dir to a "
                    "writable folder to keep it.", cache, e)
    try:
      tmp.unlink()
    except OSError:
      pass
    return False


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
    try:
      with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        decoded = list(pool.map(decode_image, payloads, [image_size] * len(payloads), chunksize=chunk))
    except concurrent.futures.process.BrokenProcessPool as e:
      # A spawned worker imports the main script again: one that calls emim at its top
      # level starts a run in each worker, which dies.
      raise DatasetError(
          f"The processes decoding {src}/{split} died before finishing. From a Python script, put the code that "
          "calls emim under `if __name__ == \"__main__\":` (each decode process imports the script again), or decode "
          "in this one process: config.data.workers=1. If instead a decode process ran out of memory, free some: "
          "the decode holds the whole split.") from e
  else:
    decoded = [decode_image(p, image_size) for p in payloads]
  shapes = sorted({a.shape for a in decoded})
  if len(shapes) != 1:
    raise DatasetError(
        f"Images in {src}/{split} have different sizes ({', '.join(f'{h}x{w}' for h, w, _ in shapes[:3])}"
        f"{', ...' if len(shapes) > 3 else ''}): set --config.data.decode_size=N to decode each to N x N (the "
        "shorter side resized to N, then the centre square), e.g. the size of the views, config.data.image_size.")
  labels = np.array([index[c] for c, _, _ in items], np.int32)
  return ImageDataset(np.stack(decoded), labels, tuple(classes))
