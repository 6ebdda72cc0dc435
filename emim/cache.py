"""What emim keeps on this disk between runs, how large it is, and how to clear it.

    python -m emim.cache                          # the user's cache, ~/.cache/emim
    python -m emim.cache --workdir=runs/cifar10   # the decode cache beside a run
    python -m emim.cache --dir=/data/.emim_cache --clear

Three kinds of files, none of which a run needs kept (a missing one is made again):
decoded image folders (``NAME-SPLIT-...npz``: beside a local work directory in
``.emim_cache/``, in ``~/.cache/emim/datasets`` for a remote one, or in
``config.data.cache_dir``), the record indices of TFDS class subsets
(``~/.cache/emim/tfds_subsets``) and compiled programs (``~/.cache/emim/jax-tests``, the
tests' XLA compilation cache). A decode of an image folder replaces the decodes of the
same folder that it supersedes; decodes of folders no longer used stay until cleared here.

``--clear`` removes only files of those kinds, by their names: anything else in the folder
(a dataset, a run, a home directory given by mistake) is left as it is, and said.
"""

from __future__ import annotations

import collections
import os
import pathlib
import re
import time

from absl import app, flags

from emim import cli, fs
from emim.data.image_folder import DECODE_FILE

USER_CACHE = pathlib.Path("~/.cache/emim").expanduser()

# What emim writes, by file name: decodes of image folders (and their temporary files),
# TFDS subset indices; and everything in the tests' compilation-cache folder.
_SUBSET_INDEX = re.compile(r".+-[0-9a-f]{16}(\.\d+\.tmp)?\.npy$")
_COMPILATION_CACHE_DIR = "jax-tests"


def is_emim_cache_file(path: pathlib.Path, root: pathlib.Path) -> bool:
  """Whether ``path`` (under ``root``) is a file emim wrote as a cache."""
  parts = path.relative_to(root).parts
  if _COMPILATION_CACHE_DIR in parts[:-1] or root.name == _COMPILATION_CACHE_DIR:
    return True
  return bool(DECODE_FILE.fullmatch(path.name) or _SUBSET_INDEX.match(path.name))


def _files(root: pathlib.Path) -> list[pathlib.Path]:
  return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()] if root.is_dir() else []


def describe(directory: str | os.PathLike, limit: int = 10) -> str:
  """A listing of a cache folder: its total and each subfolder's, then its largest cache
  files with their sizes and dates; files that are not emim's are counted apart."""
  root = pathlib.Path(directory).expanduser()
  if not root.is_dir():
    return f"{root}: no such folder (nothing cached there)"
  files = _files(root)
  ours = [p for p in files if is_emim_cache_file(p, root)]
  size = lambda ps: sum(p.stat().st_size for p in ps) / 2**20
  lines = [f"{root}: {len(ours)} cache file(s), {size(ours):.1f} MiB"]
  by_folder = collections.defaultdict(list)
  for p in ours:
    by_folder[p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else "."].append(p)
  if len(by_folder) > 1:
    lines += [f"  {name + '/':24s} {len(ps):6d} file(s) {size(ps):9.1f} MiB" for name, ps in sorted(by_folder.items())]
  for p in sorted(ours, key=lambda p: p.stat().st_size, reverse=True)[:limit]:
    stat = p.stat()
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(stat.st_mtime))
    lines.append(f"  {stat.st_size / 2**20:9.1f} MiB  {when}  {p.relative_to(root)}")
  if len(files) > len(ours):
    lines.append(f"  ({len(files) - len(ours)} other file(s) there are not emim's caches: --clear leaves them)")
  return "\n".join(lines)


def clear(directory: str | os.PathLike) -> tuple[int, int]:
  """Remove emim's cache files in a folder (and the folders they leave empty); returns
  (bytes freed, files of other kinds left alone)."""
  root = pathlib.Path(directory).expanduser()
  freed, kept = 0, 0
  for p in _files(root):
    if is_emim_cache_file(p, root):
      freed += p.stat().st_size
      p.unlink(missing_ok=True)
    else:
      kept += 1
  for folder in sorted((p for p in root.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True) if root.is_dir() else []:
    if not any(folder.iterdir()):
      folder.rmdir()
  if root.is_dir() and not any(root.iterdir()):
    root.rmdir()
  return freed, kept


def cache_dirs(workdir: str | None, directory: str | None) -> list[str]:
  """The folders a call is about: --dir, else the decode cache beside --workdir, else the
  user's cache."""
  if directory:
    return [directory]
  if workdir:
    return [fs.local_cache_dir(workdir)]
  return [str(USER_CACHE)]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  for directory in cache_dirs(FLAGS.workdir, FLAGS.dir):
    if not FLAGS.clear:
      print(describe(directory))
    elif not pathlib.Path(directory).expanduser().is_dir():
      print(f"{directory}: no such folder; nothing removed.")
    else:
      freed, kept = clear(directory)
      other = f"; {kept} file(s) that are not emim's caches left as they are" if kept else ""
      print(f"Cleared {directory}: {freed / 2**20:.1f} MiB freed{other}.")


FLAGS = flags.FLAGS

if __name__ == "__main__":
  flags.DEFINE_string("dir", None, "A cache folder (a decode cache, ~/.cache/emim, ...).")
  flags.DEFINE_string("workdir", None, "A run's work directory: the decode cache its runs share (beside it).")
  flags.DEFINE_bool("clear", False, "Remove the folder's cache files (only emim's, by their names).")
  cli.run(main)
