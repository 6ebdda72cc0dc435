"""One path type for work directories, checkpoints, exports and evaluation files: a local
folder or any filesystem ``etils.epath`` reaches (``gs://`` with the ``gcs`` extra,
``s3://``, ...), so ``--workdir=gs://bucket/run`` is the same run as a local one.

The two kinds differ in what a write is. On an object store an object is written whole
(a reader sees the old one or the new one, never half) but cannot be appended to, and a
"rename" is a copy; on a local disk a write is made atomic with a temporary file and a
rename. ``atomic_write_*`` hide that difference; files that grow (metrics) are staged
locally and uploaded whole by ``emim.metric_writer``.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
import time
import uuid

from etils import epath

Path = epath.Path
PathLike = str | os.PathLike


def as_path(path: PathLike) -> epath.Path:
  """``path`` as an ``epath.Path``; a local one (``file://`` included) made absolute, ``~``
  expanded."""
  path = os.fspath(path)
  if path.startswith("file://"):
    path = path[len("file://"):]
  if is_remote(path):
    return epath.Path(path)
  return epath.Path(os.path.abspath(os.path.expanduser(path)))


def is_remote(path: PathLike) -> bool:
  """Whether ``path`` names an object store (``gs://...``) rather than a local folder."""
  path = os.fspath(path)
  return "://" in path and not path.startswith("file://")


def ensure_directory(path: PathLike, what: str) -> epath.Path:
  """``path`` as a directory, made if needed; a clear error when it, or a folder on its
  way, is a file. ``what`` names it for the message (e.g. "--workdir")."""
  path = as_path(path)
  if path.exists() and not path.is_dir():
    raise NotADirectoryError(f"{what} {path} is a file, not a directory: choose a directory.")
  try:
    path.mkdir(parents=True, exist_ok=True)
  except (FileExistsError, NotADirectoryError) as e:
    raise NotADirectoryError(f"Cannot make {what} {path}: a part of that path is a file ({e}).") from e
  return path


def _temporary_sibling(path: epath.Path) -> epath.Path:
  # A name of this process's own in the same folder, so the rename stays on one disk.
  return path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
  """Write ``data`` so that a reader (or a crash) never sees a half-written file."""
  path = as_path(path)
  if is_remote(path):
    path.write_bytes(data)  # an object appears whole or not at all
    return
  tmp = _temporary_sibling(path)
  try:
    tmp.write_bytes(data)
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def atomic_write_text(path: PathLike, text: str) -> None:
  atomic_write_bytes(path, text.encode("utf-8"))


def check_writable(directory: PathLike, what: str, fix: str) -> None:
  """Fail now, before any work, if nothing can be written to ``directory``; the message
  names ``what`` would be written there and ``fix``."""
  directory = as_path(directory)
  probe = _temporary_sibling(directory / ".write_probe")
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise PermissionError(f"Cannot write {what} to {directory} ({type(e).__name__}: {e}). {fix}") from e


def pid_alive(pid: int) -> bool:
  """Whether a live process of this host has this pid (a zombie, killed and not yet
  reaped by its parent, is not)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process: it exists
    return True
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
  except OSError:
    return True


def staging_dir(kind: str) -> str:
  """A new local folder in which this process stages files for a remote work directory
  (``emim-<kind>-<pid>-XXXX`` in the temporary directory). Its owner removes it when
  done; the folders of processes that died without doing so (kill -9, a lost VM's disk
  kept) are removed here, by the next run that stages files on this host."""
  prefix = f"emim-{kind}-"
  root = pathlib.Path(tempfile.gettempdir())
  for stale in root.glob(f"{prefix}*"):
    pid = stale.name[len(prefix):].split("-", 1)[0]
    if pid.isdigit():
      dead = int(pid) != os.getpid() and not pid_alive(int(pid))
    else:  # named before the pid was in the name: untouched for a day, a dead process's
      touched = max([stale.stat().st_mtime] + [p.stat().st_mtime for p in stale.rglob("*")])
      dead = time.time() - touched > 86400
    if dead:
      shutil.rmtree(stale, ignore_errors=True)
  return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=root)


def local_cache_dir(workdir: PathLike) -> str:
  """Where decoded datasets are cached: beside a local work directory (shared by the runs
  next to it), or in the user's cache for a remote one (NumPy reads a local file)."""
  if is_remote(workdir):
    return str(pathlib.Path("~/.cache/emim/datasets").expanduser())
  return str(pathlib.Path(os.fspath(as_path(workdir))).parent / ".emim_cache")
