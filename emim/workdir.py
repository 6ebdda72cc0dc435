"""A training run's work directory: the files beside its checkpoints, and the lock that
keeps a second job out of it.

    config.json          the config of the latest start (each checkpoint holds its own too)
    config_history/      the earlier starts' configs, when they differed
    classes.json         the class names the labels number, and each split's counts
    metrics.jsonl        every logged metric; tensorboard/ beside it
    timings.json         decode, compile, evaluator set-up and train seconds
    lock.json            the job that trains here: host, pid, heartbeat
    checkpoints/         Orbax: state, config and data-iterator items per step

Only process 0 of a job writes these (``writes_files``); the others log.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid

from emim import fs

CONFIG_FILE, CONFIG_HISTORY_DIR = "config.json", "config_history"
CLASSES_FILE, TIMINGS_FILE, LOCK_FILE = "classes.json", "timings.json", "lock.json"


def writes_files() -> bool:
  """One writer per job: process 0."""
  import jax

  return jax.process_index() == 0


def write_json(path: fs.PathLike, value) -> None:
  fs.atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True))


def record_config(workdir: fs.Path, config_json: str) -> None:
  """Make ``config.json`` the config this start trains with. A different one already
  there (an earlier start of the run, or an attempt that failed before training) moves
  to ``config_history/`` under the time it was replaced."""
  path = workdir / CONFIG_FILE
  if path.exists():
    previous = path.read_text()
    try:
      unchanged = json.loads(previous) == json.loads(config_json)
    except ValueError:  # a torn file from before writes were atomic: keep it in the history
      unchanged = False
    if unchanged:
      return
    history = workdir / CONFIG_HISTORY_DIR
    history.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name, n = f"config.{stamp}.json", 1
    while (history / name).exists():
      n += 1
      name = f"config.{stamp}-{n}.json"
    fs.atomic_write_text(history / name, previous)
    logging.info("The config differs from the previous start's; that one is kept as %s.", history / name)
  fs.atomic_write_text(path, config_json)


# ----------------------------------------------------------------------------------
# One job per work directory.
# ----------------------------------------------------------------------------------
class WorkdirBusy(RuntimeError):
  """Another live job trains in this work directory."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process: it exists
    return True
  try:  # a zombie (killed, not yet reaped by its parent) holds nothing
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
  except OSError:
    return True


class WorkdirLock:
  """``lock.json`` in the work directory, held by process 0 of the job training there.

  The record names the holder (host, pid, command, start) and carries a heartbeat that a
  thread renews every ``heartbeat_s`` seconds. A second job is refused with the holder's
  name while the holder is alive; a dead holder's lock is broken with a warning: on the
  same host, dead means its pid is gone; from another host, that its heartbeat is older
  than ``stale_after_s``. Locally the lock is created atomically (``O_EXCL``). An object
  store has no atomic create here, so there the lock is written, left ``settle_s`` seconds
  and read back: of two jobs starting within that window, the later writer keeps it and
  the other is refused.
  """

  def __init__(self, workdir: fs.PathLike, heartbeat_s: float = 60.0, stale_after_s: float = 600.0,
               settle_s: float = 2.0):
    self.path = fs.as_path(workdir) / LOCK_FILE
    self.heartbeat_s, self.stale_after_s, self.settle_s = heartbeat_s, stale_after_s, settle_s
    self._token = uuid.uuid4().hex
    self._stop = threading.Event()
    self._thread = None
    self._held = False

  def _record(self, started: float) -> dict:
    return {"token": self._token, "host": socket.gethostname(), "pid": os.getpid(), "started": started,
            "heartbeat": time.time(), "command": " ".join(sys.argv)}

  def _read(self) -> dict | None:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (ValueError, OSError):  # torn: a holder that died while writing it
      return {}

  def _alive(self, holder: dict) -> bool:
    if not holder:
      return False
    if holder.get("host") == socket.gethostname():
      return _pid_alive(int(holder.get("pid", -1)))
    return time.time() - float(holder.get("heartbeat", 0)) < self.stale_after_s

  def _busy(self, holder: dict) -> WorkdirBusy:
    age = time.time() - float(holder.get("heartbeat", 0))
    return WorkdirBusy(
        f"{self.path.parent} is in use by another job: pid {holder.get('pid')} on {holder.get('host')}, started "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(holder.get('started', 0))))}, last heartbeat "
        f"{age:.0f}s ago ({holder.get('command', '?')}). Two jobs in one work directory would overwrite each "
        f"other's checkpoints. Wait for it or stop it, or use another --workdir; if that job is certainly dead, "
        f"delete {self.path}.")

  def acquire(self) -> "WorkdirLock":
    self.path.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if fs.is_remote(self.path):
      self._acquire_remote(started)
    else:
      self._acquire_local(started)
    self._held = True
    self._thread = threading.Thread(target=self._beat, args=(started,), name="emim-workdir-lock", daemon=True)
    self._thread.start()
    return self

  def _break_if_dead(self) -> None:
    holder = self._read()
    if holder is None:
      return
    if self._alive(holder):
      raise self._busy(holder)
    logging.warning("Breaking the lock of a job that is no longer alive (pid %s on %s): %s.", holder.get("pid"),
                    holder.get("host"), self.path)
    try:
      self.path.unlink()
    except FileNotFoundError:
      pass

  def _acquire_local(self, started: float) -> None:
    # The record is written to a file of its own, then linked to lock.json: the link is
    # atomic and fails if lock.json exists, so no reader ever sees a half-written lock.
    tmp = self.path.parent / f".{LOCK_FILE}.{self._token}"
    tmp.write_text(json.dumps(self._record(started)))
    try:
      for _ in range(3):
        try:
          os.link(os.fspath(tmp), os.fspath(self.path))
          return
        except FileExistsError:
          self._break_if_dead()
      raise self._busy(self._read() or {})
    finally:
      tmp.unlink()

  def _acquire_remote(self, started: float) -> None:
    self._break_if_dead()
    write_json(self.path, self._record(started))
    time.sleep(self.settle_s)
    holder = self._read() or {}
    if holder.get("token") != self._token:
      raise self._busy(holder)

  def _beat(self, started: float) -> None:
    while not self._stop.wait(self.heartbeat_s):
      holder = self._read()
      if not holder or holder.get("token") != self._token:
        logging.error("The lock %s is no longer this job's (now: %s); another job may be writing this work "
                      "directory.", self.path, holder)
        return
      try:
        write_json(self.path, self._record(started))
      except OSError as e:  # a transient storage error: the next beat tries again
        logging.warning("Cannot renew the lock %s (%s).", self.path, e)

  def release(self) -> None:
    if not self._held:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    holder = self._read()
    if holder and holder.get("token") == self._token:
      self.path.unlink()
    self._held = False

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
