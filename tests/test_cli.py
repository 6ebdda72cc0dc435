"""What the programs print for what a user can fix: one line naming it, not a traceback;
and a traceback for anything else (a bug)."""

import os
import subprocess
import sys

import pytest
from conftest import REPO

from emim import cli
from emim.config_base import ConfigError


class ClientConnectorError(OSError):
  """As aiohttp raises when gcsfs cannot reach GCS."""


ClientConnectorError.__module__ = "aiohttp.client_exceptions"


def test_remote_and_user_errors_are_explained_and_bugs_are_not():
  assert cli.explain(ConfigError("--config.x=0: positive")) == "--config.x=0: positive"
  try:
    try:
      raise ClientConnectorError("Cannot connect to host storage.googleapis.com:443")
    except OSError as e:
      raise RuntimeError("retries exhausted") from e
  except RuntimeError as e:
    message = cli.explain(e)
  assert "cannot reach a remote path" in message and "gcloud auth application-default login" in message
  assert 'pip install "emim[gcs]"' in cli.explain(ImportError("Please install gcsfs to access Google Storage"))
  assert cli.explain(KeyError("a bug")) is None


def test_a_user_error_exits_with_one_line_and_a_bug_with_its_traceback(capsys, monkeypatch):
  monkeypatch.setattr(cli.app, "run", lambda main, flags_parser: main([]))

  def refused(argv):
    raise ConfigError("--config.train.batch_size=0: it must be a positive integer.")

  with pytest.raises(SystemExit) as exit_info:
    cli.run(refused)
  assert exit_info.value.code == 1
  assert capsys.readouterr().err == "error: --config.train.batch_size=0: it must be a positive integer.\n"

  def buggy(argv):
    raise KeyError("a bug")

  with pytest.raises(KeyError):
    cli.run(buggy)


def test_what_the_file_system_refuses_is_one_line_naming_the_fix(tmp_path):
  """A full disk, a read-only one and a name too long: real errors of the OS (the name
  too long, the read-only disk as the kernel reports it) and TensorStore's wording."""
  import errno
  import os

  with pytest.raises(OSError) as too_long:
    os.makedirs(tmp_path / ("a" * 300))
  line = cli.explain(too_long.value)
  assert "is longer than the file system allows (300 bytes; most allow 255 a name): choose a shorter --workdir" in line
  read_only = OSError(errno.EROFS, "Read-only file system", "/mnt/runs/cifar/lock.json")
  assert cli.explain(read_only).startswith("/mnt/runs/cifar/lock.json is on a read-only file system, and training "
                                           "writes its checkpoints and lock there: choose a --workdir on a writable disk.")
  try:
    try:
      raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as e:
      raise ValueError("RESOURCE_EXHAUSTED: Failed writing: [os_error_code='28']") from e
  except ValueError as e:
    full = cli.explain(e)
  assert full.startswith("the disk is full (No space left on device): free space on it") and "nothing already saved" \
      " was lost" in full
  assert cli.explain(ValueError("a bug")) is None


def test_a_relative_config_path_from_outside_the_repository_names_the_repositorys_file(tmp_path):
  result = subprocess.run([sys.executable, "-m", "emim.main", "--config=configs/cifar10.py:runlocal",
                           f"--workdir={tmp_path / 'w'}"], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert result.returncode == 2 and "Traceback" not in result.stderr  # a usage error, as absl's
  assert result.stderr.strip().endswith(f"the paths of configs are relative to the repository's root; run from there, "
                                        f"or give --config={REPO / 'configs' / 'cifar10.py'}.")


def test_emim_mains_config_mistakes_are_one_line_each(tmp_path, capsys):
  """emim.main's flags (its config file and a --workdir) as parse_flags reads them: each mistake in the config's
  name, file or overrides is one line, exit status 2; a config and its overrides as written are read."""
  from absl import flags
  from ml_collections import config_flags

  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(arg=None:\n  pass\n")
  config = f"--config={REPO / 'configs' / 'synthetic.py'}:runlocal"
  for argv, says in (([f"--config={tmp_path / 'nope.py'}"], "does not exist"),
                     ([f"--config={broken}"], f"{broken}, line 1: "),
                     ([config, "--config.train.nofield=1"], "cannot apply --config.train.nofield: the config has no "
                                                             "field 'nofield'"),
                     ([config, "--config.train.num_epochs=abc"], "--config.train.num_epochs=abc: invalid literal"),
                     (["--config", "--workdir=/tmp/w"], "--config is followed by --workdir=/tmp/w, not a config file")):
    fv = flags.FlagValues()
    argv = ["emim.main", *argv] + ([] if "--workdir=/tmp/w" in argv else ["--workdir=/tmp/w"])
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "", flag_values=fv)
    with pytest.raises(SystemExit) as exit:
      cli.parse_flags(argv, fv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith("error: ") and says in err.splitlines()[0], (argv, err)
    assert "Traceback" not in err
  fv = flags.FlagValues()
  argv = ["emim.main", "--config", f"{REPO / 'configs' / 'synthetic.py'}:runlocal", "--config.train.num_epochs", "3",
          "--workdir=/tmp/w"]
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  assert cli.parse_flags(argv, fv) == ["emim.main"] and fv.config.train.num_epochs == 3 and fv.workdir == "/tmp/w"


@pytest.mark.parametrize("program", ["emim.main", "emim.evaluate", "emim.export"])
def test_a_flagfile_that_cannot_be_read_is_one_line_in_every_program(tmp_path, program):
  """The config flag reads the flagfiles as it is defined (at import for emim.main), before
  emim's flag parsing: a missing one was absl's traceback there."""
  missing = tmp_path / "missing.txt"
  result = subprocess.run([sys.executable, "-m", program, f"--flagfile={missing}", f"--workdir={tmp_path}"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
  assert result.stderr.strip() == (f"error: Unable to open flagfile: [Errno 2] No such file or directory: '{missing}': "
                                   "give --flagfile an existing file (flags, one a line).")


def test_check_flagfiles_names_what_is_wrong_and_passes_readable_ones(tmp_path, capsys):
  good, nested = tmp_path / "good.txt", tmp_path / "nested.txt"
  good.write_text("--workdir=/tmp/w\n")
  nested.write_text(f"--flagfile={tmp_path / 'gone.txt'}\n")
  cli.check_flagfiles(["prog", f"--flagfile={good}", "--flagfile", str(good)])  # readable: nothing said
  for argv, says in ((["prog", "--flagfile"], "--flagfile is followed by nothing, not a file"),
                     (["prog", "-flagfile", "--workdir=x"], "-flagfile is followed by --workdir=x, not a file"),
                     (["prog", f"--flagfile={nested}"], f"No such file or directory: '{tmp_path / 'gone.txt'}'"),
                     (["prog", f"--flagfile={tmp_path}"], "Is a directory")):
    with pytest.raises(SystemExit) as exit:
      cli.check_flagfiles(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.startswith("error: ") and says in err and err.count("\n") == 1, (argv, err)
