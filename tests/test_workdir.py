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


def eventually(condition, timeout_s=60.0) -> bool:
  """Whether ``condition()`` holds within ``timeout_s``: a heartbeat thread's timing on a
  loaded machine (the emulator answering slowly) is no fixed sleep's."""
  deadline = time.monotonic() + timeout_s
  while not condition():
    if time.monotonic() > deadline:
      return False
    time.sleep(0.05)
  return True


def write_record(path, **fields):
  record = {"token": "other", "host": socket.gethostname(), "pid": dead_pid(), "started": time.time(),
            "heartbeat": time.time(), "command": "python -m emim.main ...", **fields}
  path.write_text(json.dumps(record))


def test_a_live_job_holds_the_local_lock_and_its_death_releases_it(tmp_path):
  """The kernel's lock: held while the holder lives, dropped when it is killed (-9),
  whatever lock.json says."""
  holder = subprocess.Popen(
      [sys.executable, "-c", f"from emim.workdir import WorkdirLock; WorkdirLock({str(tmp_path)!r}).acquire(); "
                             "print('held', flush=True); import time; time.sleep(600)"],
      stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(WorkdirBusy, match=rf"in use by another job: pid {holder.pid} on {socket.gethostname()}"):
    WorkdirLock(tmp_path).acquire()
  holder.kill()
  holder.wait()
  with WorkdirLock(tmp_path) as lock:
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    with pytest.raises(WorkdirBusy):  # one holder at a time, in one process too
      WorkdirLock(tmp_path).acquire()
  assert not lock.path.exists()  # released: nothing left in the work directory
  write_record(tmp_path / workdir_lib.LOCK_FILE, pid=os.getpid())  # what it says does not matter: no one locks it
  WorkdirLock(tmp_path).acquire().release()


def test_the_remote_lock_follows_the_heartbeat_and_a_job_overtaken_stops(fake_gcs, caplog):
  remote = f"{fake_gcs}/locks/run"
  path = workdir_lib.fs.as_path(remote) / workdir_lib.LOCK_FILE
  fast = lambda: WorkdirLock(remote, heartbeat_s=0.05, stale_after_s=60, settle_s=0.1)
  write_record(path, host="another-host", heartbeat=time.time() - 5)  # another host, beating
  with pytest.raises(WorkdirBusy, match="on another-host"):
    fast().acquire()
  write_record(path, host="another-host", heartbeat=time.time() - 3600)  # silent for an hour
  fast().acquire().release()
  assert "no longer alive" in caplog.text and not path.exists()
  write_record(path, pid=os.getpid())  # this host, a pid reused (a container's 1): not the holder
  fast().acquire().release()
  lock = fast().acquire()
  first = json.loads(path.read_text())["heartbeat"]
  assert eventually(lambda: json.loads(path.read_text())["heartbeat"] > first)  # renewed
  # Another job's record, written until the holder's next beat reads it (a beat that read
  # its own record just before may write over it once: a taker settles and reads back).
  assert eventually(lambda: lock.lost is not None or write_record(path, token="intruder", host="another-host"))
  with pytest.raises(WorkdirBusy, match="took over"):
    lock.check()
  lock.release()
  assert json.loads(path.read_text())["token"] == "intruder"  # not ours: left alone


def test_the_config_of_every_start_is_recorded_and_earlier_ones_kept(tmp_path):
  workdir_lib.record_config(tmp_path, json.dumps({"lr": 1}))
  workdir_lib.record_config(tmp_path, json.dumps({"lr": 1}))  # the same again: nothing new
  assert not (tmp_path / workdir_lib.CONFIG_HISTORY_DIR).exists()
  workdir_lib.record_config(tmp_path, json.dumps({"lr": 0.5}))
  assert json.loads((tmp_path / "config.json").read_text()) == {"lr": 0.5}
  history = list((tmp_path / workdir_lib.CONFIG_HISTORY_DIR).iterdir())
  assert len(history) == 1 and json.loads(history[0].read_text()) == {"lr": 1}


@pytest.mark.slow
def test_an_attempt_that_never_trained_leaves_no_config_and_the_real_one_is_exported(tmp_path, monkeypatch):
  """The issue's case: a first attempt with another model width is interrupted while
  compiling; the corrected run trains; config.json, the export's model.json and the
  evaluation's model are the corrected run's."""
  from emim import compiled

  off = {"eval.mi_every_steps": 0}  # (no MI tracker: each config here would compile its own)
  wide = tiny_synthetic(**{"model.width": 16, **off})
  real_once = compiled.once

  def interrupted_at_the_step(what, key, build):  # (whether or not this process compiled it before)
    if what == "train_step":
      raise KeyboardInterrupt
    return real_once(what, key, build)

  with monkeypatch.context() as patch:
    patch.setattr(compiled, "once", interrupted_at_the_step)
    with pytest.raises(KeyboardInterrupt):
      train.run(wide, str(tmp_path))
  assert not (tmp_path / "config.json").exists()
  WorkdirLock(tmp_path).acquire().release()  # the interrupted attempt released its lock
  narrow = tiny_synthetic(**off)  # width 8
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
