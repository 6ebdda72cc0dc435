"""What emim keeps on this disk between runs, how large it is, and how to clear it.

    python -m emim.cache                          # the user's cache, ~/.cache/emim
    python -m emim.cache --workdir=runs/cifar10   # the decode cache beside a run
    python -m emim.cache --dir=/data/.emim_cache --clear

Three kinds of files, none of which a run needs kept (a missing one is made again):
decoded image folders (``*.npz``: beside a local work directory in ``.emim_cache/``, in
``~/.cache/emim/datasets`` for a remote one, or in ``config.data.cache_dir``), the record
indices of TFDS class subsets (``~/.cache/emim/tfds_subsets``) and compiled programs
(``~/.cache/emim/jax-tests``, the tests' XLA compilation cache). A decode of an image
folder replaces the decodes of the same folder that it supersedes; decodes of folders
no longer used stay until cleared here.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import time

from absl import app, flags

from emim import cli, fs

USER_CACHE = pathlib.Path("~/.cache/emim").expanduser()


def cache_files(directory: str | os.PathLike) -> list[pathlib.Path]:
  """Every file under ``directory`` (none if it does not exist), largest first."""
  root = pathlib.Path(directory).expanduser()
  files = [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else []
  return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def describe(directory: str | os.PathLike, limit: int = 20) -> str:
  """A listing of a cache folder: its total, then its largest files with their sizes and
  dates."""
  files = cache_files(directory)
  total = sum(p.stat().st_size for p in files)
  lines = [f"{directory}: {len(files)} file(s), {total / 2**20:.1f} MiB"]
  for p in files[:limit]:
    stat = p.stat()
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(stat.st_mtime))
    lines.append(f"  {stat.st_size / 2**20:9.1f} MiB  {when}  {p.relative_to(pathlib.Path(directory).expanduser())}")
  if len(files) > limit:
    lines.append(f"  ... and {len(files) - limit} more")
  return "\n".join(lines)


def clear(directory: str | os.PathLike) -> int:
  """Remove everything in a cache folder; returns the bytes freed. Refuses a folder that
  holds anything but caches (a work directory, a project), so a wrong --dir loses nothing."""
  root = pathlib.Path(directory).expanduser()
  if not root.is_dir():
    return 0
  foreign = [p.name for p in root.iterdir() if p.name in ("checkpoints", "metrics.jsonl", "config.json", "setup.py", ".git")]
  if foreign:
    raise FileNotFoundError(f"{root} holds {foreign}: it is not a cache folder. Give the cache itself, e.g. "
                            f"--dir={root / '.emim_cache'} or --workdir={root / 'RUN'}.")
  freed = sum(p.stat().st_size for p in cache_files(root))
  shutil.rmtree(root)
  return freed


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
    if FLAGS.clear:
      print(f"Removed {directory}: {clear(directory) / 2**20:.1f} MiB freed.")
    else:
      print(describe(directory))


FLAGS = flags.FLAGS

if __name__ == "__main__":
  flags.DEFINE_string("dir", None, "A cache folder (a decode cache, ~/.cache/emim, ...).")
  flags.DEFINE_string("workdir", None, "A run's work directory: the decode cache its runs share.")
  flags.DEFINE_bool("clear", False, "Remove the folder's cached files.")
  cli.run(main)
