"""What the three programs (emim.main, emim.evaluate, emim.export) share on the command
line: errors a user can fix are one message, not a traceback.

A mistyped config field (``--config.train.batchsize=3``) fails inside absl's flag parsing
as a chain of KeyError and AttributeError tracebacks; ``parse_flags`` turns it into one
line naming the flag and, when ml_collections has one, the field meant. Errors of the
programs themselves that name their fix (a missing dataset, a busy work directory, an
unreadable checkpoint, ...) are printed as their message and exit with status 1. On a
machine without an accelerator, JAX runs on the CPU without probing for a TPU
(``cpu_without_accelerator``).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
import sys

import ml_collections
from absl import app, flags

from emim.errors import UserError, explain_os_error, missing_config_file


def fail(message: str, status: int = 2) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(status)


def _fail(message: str) -> None:
  fail(message, 2)


def check_flagfiles(argv: list[str]) -> None:
  """Each --flagfile of ``argv`` readable, or one line (exit 2) saying which is not: the
  config flag reads the command line, flagfiles included, as it is defined, before
  ``parse_flags``, where absl's error would be a traceback."""
  for k, arg in enumerate(argv):
    if arg in ("--flagfile", "-flagfile") and (k + 1 == len(argv) or argv[k + 1].startswith("-")):
      fail(f"{arg} is followed by {'nothing' if k + 1 == len(argv) else argv[k + 1]}, not a file: give one, "
           "e.g. --flagfile=flags.txt (flags, one a line).")
  try:  # absl's own reading: a missing file, a folder, a flagfile that names a missing one
    flags.FlagValues().read_flags_from_files(list(argv), force_gnu=False)
  except flags.Error as e:
    fail(f"{' '.join(str(e).split()).removeprefix('ERROR:: ')}: give --flagfile an existing file (flags, one a line).")


def parse_flags(argv: list[str], flag_values: flags.FlagValues | None = None) -> list[str]:
  """absl's flag parsing (of ``flag_values``, by default absl's global flags), with
  config-override mistakes reported in one line."""
  check_flagfiles(argv)  # emim.export's and any program's without a config flag: the same line
  for arg, after in zip(argv[1:], argv[2:] + [""]):
    if arg.startswith("--config=") or (arg == "--config" and after):  # --config=FILE or --config FILE
      if arg == "--config" and after.startswith("-"):  # absl would read the next flag as the file's name
        _fail(f"--config is followed by {after}, not a config file: give one, e.g. --config=configs/cifar10.py.")
      path = (arg.split("=", 1)[1] if "=" in arg else after).split(":", 1)[0]
      if os.path.isdir(path):
        _fail(f"{path} is a folder: give a config file in it, e.g. configs/cifar10.py.")
      if not os.path.isfile(path):
        _fail(missing_config_file(path))
      with open(path, encoding="utf-8", errors="replace") as f:
        source = f.read()
      if "def get_config" not in source:
        _fail(f"{path} defines no get_config(arg): it is not an emim config (the configs are configs/*.py).")
      try:  # ml_collections would let a SyntaxError through as a traceback
        compile(source, path, "exec")
      except SyntaxError as e:
        _fail(f"{path}, line {e.lineno}: {e.msg}: the config file is not valid Python ({(e.text or '').strip()!r}).")
  fv = flags.FLAGS if flag_values is None else flag_values
  try:
    rest = fv(argv)
  except flags.Error as e:  # a malformed value, a missing required flag, a config that raised
    text = str(e)
    if "Traceback (most recent call last)" in text:  # a config file's error: its first and last lines
      lines = [line for line in text.splitlines() if line.strip()]
      text = f"{lines[0]} {lines[-1]}"
    _fail(f"{text}\n  (--helpfull lists the flags)")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    config_override_failed(argv, e)
  config = fv["config"].value if "config" in fv else None
  if config is not None and not isinstance(config, ml_collections.ConfigDict):  # else a traceback where it is read
    _fail(f"the config file's get_config(arg) returned {type(config).__name__}, not an ml_collections.ConfigDict: an "
          "emim config returns emim.config_base.base_config() with its fields set (see configs/*.py).")
  return rest


def config_override_failed(argv: list[str], error: Exception) -> None:
  """Exit with one line for a --config.x=y that cannot apply (an unknown field, a value
  of the wrong type), raised while parsing or while defining the flag."""
  bad = ", ".join(arg.split("=", 1)[0] for arg in argv[1:] if arg.startswith("--config.")) or "--config"
  # ml_collections nests KeyError reprs inside AttributeError: unescape to one line.
  text = str(error)
  if len(text) > 1 and text[0] == text[-1] == "'":
    text = text[1:-1]
  text = text.replace("\\n", " ").replace("\\'", "'").replace("\n", " ")
  unknown = re.fullmatch(r"\"?'(\w+)'\"?", text)  # a bare KeyError: a field the config does not have
  if unknown:
    text = f"the config has no field {unknown.group(1)!r}"
  _fail(f"cannot apply {bad}: {text}\n  (a run's config.json lists every field of its config)")


def user_errors() -> tuple[type[BaseException], ...]:
  """The errors whose message names the fix: every module's own (``emim.errors``) and the
  operating system's about paths."""
  return (UserError, FileNotFoundError, PermissionError, NotADirectoryError, FloatingPointError)


# Where an exception from these packages comes from a remote filesystem: its client's
# retries exhausted (no network, no such bucket, no credentials).
_REMOTE_CLIENTS = ("aiohttp", "gcsfs", "google.auth", "google.api_core", "s3fs", "botocore", "fsspec")


def explain(error: BaseException) -> str | None:
  """One line for an error a user can fix; None for anything else (a bug: a traceback)."""
  if isinstance(error, UserError):
    return " ".join(str(error).split())  # one line, whatever the error it quotes spans
  os_error = explain_os_error(error)  # a full disk, a read-only one, a name too long
  if os_error is not None:
    return os_error
  if isinstance(error, user_errors()):
    return " ".join(str(error).split())
  chain, e = [], error
  while e is not None and len(chain) < 10:
    chain.append(e)
    e = e.__cause__ or e.__context__
  if isinstance(error, ImportError) and "gcsfs" in str(error):
    return f"{error}: gs:// paths need the gcs extra: pip install \"emim[gcs]\" (or pip install -e \".[gcs]\")."
  if any(type(e).__module__.split(".")[0] in {m.split(".")[0] for m in _REMOTE_CLIENTS} for e in chain):
    return (f"cannot reach a remote path ({type(error).__name__}: {str(error)[:300]}). Check the path and the "
            "credentials (gcloud auth application-default login, or the VM's service account), and that the gcs "
            "extra is installed (pip install \"emim[gcs]\").")
  return None


_GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


def _libtpu_installed() -> bool:
  try:
    return importlib.util.find_spec("libtpu") is not None
  except (ImportError, ValueError):  # a module that cannot be found or imported
    return False


def _drop_tpu_probe(record: logging.LogRecord) -> bool:
  """A logging filter: False for JAX's line about the TPU backend it could not start."""
  return "Unable to initialize backend 'tpu'" not in record.getMessage()


def cpu_without_accelerator() -> None:
  """Run JAX on the CPU, without first trying a TPU, where libtpu is installed (the tpu
  extra, which CI and python -m emim.aot use) but this machine has no TPU and no
  GPU. Otherwise JAX, with ``JAX_PLATFORMS`` unset, starts libtpu first: it prints errors
  about the TPU it cannot find and holds /tmp/libtpu_lockfile for the whole process.
  Acts only before JAX starts its backends, and never when ``JAX_PLATFORMS`` is set.
  Without libtpu no TPU is meant: JAX's probe for one still logs "Unable to initialize
  backend 'tpu': ... libtpu.so", which reads like a failure, and that line is dropped."""
  if os.environ.get("JAX_PLATFORMS"):
    return
  if not _libtpu_installed():
    logging.getLogger("jax._src.xla_bridge").addFilter(_drop_tpu_probe)
    return
  if any(os.path.exists(path) for path in _GPU_DEVICE_FILES):
    return
  try:  # the TPU chips on this machine's PCI bus, as JAX counts them
    from jax._src import hardware_utils

    if hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0:
      return
  except (ImportError, AttributeError, OSError):  # another JAX: leave the choice to it
    return
  os.environ["JAX_PLATFORMS"] = "cpu"
  if "jax" in sys.modules:
    import jax

    jax.config.update("jax_platforms", "cpu")


def run(main) -> None:
  """``app.run(main)``, with clean messages for what a user can fix."""

  @functools.wraps(main)
  def guarded(argv):
    cpu_without_accelerator()
    try:
      return main(argv)
    except KeyboardInterrupt:
      fail("interrupted (Ctrl-C); nothing already saved was lost.", 130)
    except Exception as e:
      message = explain(e)
      if message is None:
        raise
      fail(message, 1)

  app.run(guarded, flags_parser=parse_flags)
