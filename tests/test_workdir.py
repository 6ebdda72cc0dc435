"""The work directory: one job at a time (a lock naming its holder, broken when the holder
is dead), and the config of every start recorded, the earlier ones kept."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import tiny_synthetic

from emim import export, train
from emim import workdir as workdir_lib
from emim.backbone import load_run_config, restore_backbone
from emim.workdir import WorkdirBusy, WorkdirLock


def dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def write_lock(workdir, **fields):
  record = {"token": "other", "host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
            "heartbeat": time.time(), "command": "python -m emim.main ...", **fields}
  (workdir / workdir_lib.LOCK_FILE).write_text(json.dumps(record))


def test_a_live_holder_refuses_a_second_job_and_a_dead_ones_lock_is_broken(tmp_path, caplog):
  write_lock(tmp_path)  # this very process: alive
  with pytest.raises(WorkdirBusy, match=rf"in use by another job: pid {os.getpid()} on {socket.gethostname()}.*delete"):
    WorkdirLock(tmp_path).acquire()
  write_lock(tmp_path, host="another-host", heartbeat=time.time() - 5)  # another host, beating
  with pytest.raises(WorkdirBusy, match="on another-host"):
    WorkdirLock(tmp_path, stale_after_s=60).acquire()
  write_lock(tmp_path, host="another-host", heartbeat=time.time() - 3600)  # another host, silent for an hour
  with WorkdirLock(tmp_path, stale_after_s=60) as lock:
    held = json.loads(lock.path.read_text())
    assert held["pid"] == os.getpid() and held["token"] != "other"
  assert not lock.path.exists()  # released
  pid = dead_pid()
  write_lock(tmp_path, pid=pid)  # this host, its process gone (killed, or the machine's job ended)
  with WorkdirLock(tmp_path):
    pass
  assert f"no longer alive (pid {pid}" in caplog.text


def test_the_heartbeat_renews_the_lock_and_a_lock_taken_over_is_reported(tmp_path, caplog):
  lock = WorkdirLock(tmp_path, heartbeat_s=0.05).acquire()
  first = json.loads(lock.path.read_text())["heartbeat"]
  time.sleep(0.5)
  assert json.loads(lock.path.read_text())["heartbeat"] > first
  write_lock(tmp_path, token="intruder")
  time.sleep(0.3)
  assert "no longer this job's" in caplog.text
  lock.release()
  assert json.loads(lock.path.read_text())["token"] == "intruder"  # not ours: left alone


def test_the_config_of_every_start_is_recorded_and_earlier_ones_kept(tmp_path):
  workdir_lib.record_config(tmp_path, json.dumps({"lr": 1}))
  workdir_lib.record_config(tmp_path, json.dumps({"lr": 1}))  # the same again: nothing new
  assert not (tmp_path / workdir_lib.CONFIG_HISTORY_DIR).exists()
  workdir_lib.record_config(tmp_path, json.dumps({"lr": 0.5}))
  assert json.loads((tmp_path / "config.json").read_text()) == {"lr": 0.5}
  history = list((tmp_path / workdir_lib.CONFIG_HISTORY_DIR).iterdir())
  assert len(history) == 1 and json.loads(history[0].read_text()) == {"lr": 1}


def test_an_attempt_that_never_trained_leaves_no_config_and_the_real_one_is_exported(tmp_path, monkeypatch):
  """The issue's case: a first attempt with another model width is interrupted while
  compiling; the corrected run trains; config.json, the export's model.json and the
  evaluation's model are the corrected run's."""
  wide = tiny_synthetic(**{"model.width": 16})

  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  with monkeypatch.context() as patch:
    patch.setattr(train, "compile_train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
      train.run(wide, str(tmp_path))
  assert not (tmp_path / "config.json").exists() and not (tmp_path / workdir_lib.LOCK_FILE).exists()
  narrow = tiny_synthetic()  # width 8
  train.run(narrow, str(tmp_path))
  assert json.loads((tmp_path / "config.json").read_text())["model"]["width"] == 8
  config = load_run_config(tmp_path)
  step, backbone = restore_backbone(tmp_path, config)
  out = export.export_backbone(backbone, tmp_path / "export", {"step": step})
  assert json.loads((out / export.MODEL_FILE).read_text())["width"] == 8
  # A later start with another learning rate: the history keeps the first, each
  # checkpoint its own.
  with narrow.unlocked():
    narrow.optim.base_lr, narrow.train.num_steps = 0.5 * narrow.optim.base_lr, 6
  train.run(narrow, str(tmp_path))
  assert len(list((tmp_path / workdir_lib.CONFIG_HISTORY_DIR).iterdir())) == 1
  assert load_run_config(tmp_path, 4).optim.base_lr == 2 * load_run_config(tmp_path, 6).optim.base_lr
