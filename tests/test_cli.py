"""What the programs print for what a user can fix: one line naming it, not a traceback;
and a traceback for anything else (a bug)."""

import pytest

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
