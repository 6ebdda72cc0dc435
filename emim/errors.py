"""The errors a user can fix, as opposed to bugs.

Every module raises its own kind (``ConfigError``, ``DatasetError``, ``CheckpointError``,
``ExportError``, ``WorkdirBusy``), each a ``UserError`` whose message names the fix; the
programs' command lines (``emim.cli``) print a ``UserError`` as one line and exit, and
keep the traceback of anything else. The base class lives here, apart from the modules
and from the command line, so that neither imports the other. Nothing here imports JAX.
"""

import os


class UserError(Exception):
  """An error whose message names the fix (a missing dataset, a wrong flag value, a busy
  work directory, an unreadable checkpoint, ...)."""


# What a failed write says about the disk, in the words of the OS (an OSError's errno) or
# of TensorStore (which Orbax writes checkpoints with: a ValueError quoting the OS error).
_DISK_FULL = (28, 122)  # ENOSPC, EDQUOT
_READ_ONLY, _NAME_TOO_LONG = 30, 36  # EROFS, ENAMETOOLONG
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "os_error_code='28'", "os_error_code='122'")


def _chain(error: BaseException):
  seen = []
  while error is not None and len(seen) < 10 and error not in seen:
    seen.append(error)
    error = error.__cause__ or error.__context__
  return seen


def is_disk_full(error: BaseException) -> bool:
  """Whether ``error`` (or one it was raised from) says that the disk is full."""
  return any(getattr(e, "errno", None) in _DISK_FULL or any(t in str(e) for t in _DISK_FULL_TEXT)
             for e in _chain(error))


def explain_os_error(error: BaseException) -> str | None:
  """One line for a write the file system refused for a reason the user fixes (a full
  disk, a read-only one, a name too long); None for any other error."""
  if is_disk_full(error):
    where = next((e.filename for e in _chain(error) if getattr(e, "filename", None)), None)
    return (f"the disk is full (No space left on device{f', writing {where}' if where else ''}): free space on it "
            "(or move the work directory to a disk with room) and run the same command; it resumes from the last "
            f"complete checkpoint, and nothing already saved was lost. ({type(error).__name__}: "
            f"{' '.join(str(error).split())[:200]})")
  for e in _chain(error):
    if getattr(e, "errno", None) == _READ_ONLY:
      return (f"{e.filename or 'the path'} is on a read-only file system, and training writes its checkpoints and "
              "lock there: choose a --workdir on a writable disk. (A finished run can be read where it is: "
              "emim.evaluate with --results_dir, emim.export with --output, on a writable disk.)")
    if getattr(e, "errno", None) == _NAME_TOO_LONG:
      name = max(os.fspath(e.filename or "").split("/"), key=len, default="")
      return (f"a name in the path {e.filename} is longer than the file system allows ({len(name.encode())} "
              "bytes; most allow 255 a name): choose a shorter --workdir (or --output).")
  return None


def missing_config_file(path: str) -> str:
  """The line for a --config file that does not exist: a relative configs/NAME.py run from
  outside the repository is the usual cause, so name the repository's own file."""
  ours = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)
  if not os.path.isabs(path) and os.path.isfile(ours):
    return (f"the config file {path} does not exist in {os.getcwd()}: the paths of configs are relative to the "
            f"repository's root; run from there, or give --config={ours}.")
  return f"the config file {path} does not exist (the configs are configs/*.py, e.g. --config=configs/cifar10.py:byol)."
