"""A training run's work directory: the files beside its checkpoints, and the lock that
keeps a second job out of it.

    config.json          the config of the latest start (each checkpoint holds its own too)
    config_history/      the earlier starts' configs, when they differed
    classes.json         the class names the labels number
    metrics.jsonl        every logged metric; tensorboard/ beside it
    timings.json         decode, compile, evaluator set-up and train seconds
    lock.json            the job that trains here (a kernel lock; its host, pid, command)
    checkpoints/         Orbax: state, config and data-iterator items per step

Only process 0 of a job writes these (``writes_files``); the others log.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid

from emim import fs
from emim.errors import UserError

CONFIG_FILE, CONFIG_HISTORY_DIR = "config.json", "config_history"
CLASSES_FILE, TIMINGS_FILE, LOCK_FILE = "classes.json", "timings.json", "lock.json"


def writes_files() -> bool:
  """One writer per job: process 0."""
  import jax

  return jax.process_index() == 0


def write_json(path: fs.PathLike, value) -> None:
  fs.atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True))


def update_json(path: fs.PathLike, update) -> dict:
  """Read a JSON object, ``update(table)`` it in place, write it back whole; returns it.
  Locally two programs doing this at once (two evaluations) take turns under an ``flock``
  of the folder that holds it, so both results land and no lock file is left behind. A
  file that is not JSON is moved aside (named in a warning), never written over."""
  path = fs.as_path(path)
  with contextlib.ExitStack() as stack:
    if not fs.is_remote(path):
      fd = os.open(os.fspath(path.parent), os.O_RDONLY)
      stack.callback(os.close, fd)
      fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd closes
      # The sibling lock file of earlier versions, left in work directories.
      with contextlib.suppress(FileNotFoundError):
        os.remove(os.fspath(path) + ".lock")
    table = {}
    if path.exists():
      try:
        table = json.loads(path.read_text())
      except ValueError:
        aside = path.parent / f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
        fs.atomic_write_bytes(aside, path.read_bytes())
        logging.warning("%s was not valid JSON; moved it to %s and started a new one.", path, aside)
    update(table)
    write_json(path, table)
  return table


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
class WorkdirBusy(UserError, RuntimeError):
  """Another live job trains in this work directory."""


def _pid_alive(pid: int) -> bool:
  # A record of this pid is not this process's (a pid reused: a container's 1).
  return pid != os.getpid() and fs.pid_alive(pid)


class WorkdirLock:
  """The one job that may train in a work directory: process 0 of it holds ``lock.json``.

  Locally the lock is the kernel's: an exclusive ``flock`` on lock.json, held while the
  process lives and dropped by the kernel when it ends (kill -9 included), so a dead
  holder never blocks a resume and two jobs never both hold it; the file's content only
  names the holder (host, pid, command, start) for the refusal message.

  An object store (gs://) has no locks. There the holder writes its record and a thread
  renews its heartbeat every ``heartbeat_s`` seconds; a record whose heartbeat is older
  than ``stale_after_s``, or whose pid is gone on this very host, is a dead holder's, and
  a new job writes over it. The record is written, left ``settle_s`` seconds and read
  back: of two jobs writing at once, the later keeps it and the other is refused. A job
  whose record another has overwritten learns it at its next heartbeat (``lost``), and
  the training loop stops it.
  """

  def __init__(self, workdir: fs.PathLike, heartbeat_s: float = 60.0, stale_after_s: float = 600.0,
               settle_s: float = 2.0):
    self.path = fs.as_path(workdir) / LOCK_FILE
    self.heartbeat_s, self.stale_after_s, self.settle_s = heartbeat_s, stale_after_s, settle_s
    self._token = uuid.uuid4().hex
    self._remote = fs.is_remote(self.path)
    self._stop = threading.Event()
    self._thread = None
    self._fd = None
    self._held = False
    self.lost: dict | None = None  # the record that replaced this job's (remote only)

  def _record(self, started: float) -> dict:
    return {"token": self._token, "host": socket.gethostname(), "pid": os.getpid(), "started": started,
            "heartbeat": time.time(), "command": " ".join(sys.argv)}

  def _read(self) -> dict | None:
    """The holder's record; None when there is none, {} when it is torn (its writer died
    while writing). A storage error is raised: it says nothing about the holder."""
    try:
      text = self.path.read_text()
    except FileNotFoundError:
      return None
    try:
      return json.loads(text) if text.strip() else {}
    except ValueError:
      return {}

  def _alive(self, holder: dict) -> bool:
    if not holder:
      return False
    fresh = time.time() - float(holder.get("heartbeat", 0)) < self.stale_after_s
    if holder.get("host") == socket.gethostname():
      return fresh and _pid_alive(int(holder.get("pid", -1)))
    return fresh

  def _busy(self, holder: dict) -> WorkdirBusy:
    age = time.time() - float(holder.get("heartbeat", 0))
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
    what = (f"its lock is released when that process ends; if the job is certainly dead, delete {self.path}, or "
            f"wait until its heartbeat ({age:.0f}s ago) is {self.stale_after_s:.0f}s old" if self._remote else
            "the lock is released when that process ends (the kernel drops it, kill -9 included)")
    return WorkdirBusy(
        f"{self.path.parent} is in use by another job: pid {holder.get('pid', '?')} on {holder.get('host', '?')}, "
        f"started {started} ({holder.get('command', '?')}). Two jobs in one work directory would overwrite each "
        f"other's checkpoints. Wait for it or stop it, or use another --workdir; {what}.")

  def acquire(self) -> "WorkdirLock":
    fs.ensure_directory(self.path.parent, "--workdir")
    started = time.time()
    if self._remote:
      self._acquire_remote(started)
      self._thread = threading.Thread(target=self._beat, args=(started,), name="emim-workdir-lock", daemon=True)
      self._thread.start()
    else:
      self._acquire_local(started)
    self._held = True
    return self

  def _acquire_local(self, started: float) -> None:
    while True:
      fd = os.open(os.fspath(self.path), os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        raise self._busy(self._read() or {}) from None
      try:
        if os.fstat(fd).st_ino == os.stat(os.fspath(self.path)).st_ino:
          break
      except FileNotFoundError:
        pass
      os.close(fd)  # lock.json was removed or replaced while we locked the old one: lock the new one
    data = json.dumps(self._record(started)).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    self._fd = fd

  def _acquire_remote(self, started: float) -> None:
    holder = self._read()
    if holder is not None and self._alive(holder):
      raise self._busy(holder)
    if holder is not None:
      logging.warning("Taking over the lock of a job that is no longer alive (pid %s on %s): %s.", holder.get("pid"),
                      holder.get("host"), self.path)
    write_json(self.path, self._record(started))
    time.sleep(self.settle_s)
    holder = self._read() or {}
    if holder.get("token") != self._token:
      raise self._busy(holder)

  def _beat(self, started: float) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        holder = self._read()
        if not holder or holder.get("token") != self._token:
          self.lost = holder or {}
          logging.error("The lock %s is no longer this job's (now: %s): another job writes this work directory; "
                        "this one stops at its next progress line.", self.path, holder)
          return
        write_json(self.path, self._record(started))
      except Exception as e:  # a transient storage error (gcsfs raises more than OSError): the next beat tries again
        logging.warning("Cannot renew the lock %s (%s: %s); trying again in %.0fs.", self.path, type(e).__name__, e,
                        self.heartbeat_s)

  def check(self) -> None:
    """Raise if another job has taken this job's lock (see ``lost``)."""
    if self.lost is not None:
      raise WorkdirBusy(f"Another job took over {self.path} while this one was training ({self.lost}); stopped so "
                        "that the two do not overwrite each other's checkpoints.")

  def release(self) -> None:
    if not self._held:
      return
    self._held = False
    if self._fd is not None:
      # Removed while still locked (if the path is still this lock's file, not one that
      # replaced it): a job that opened it meanwhile and locks it next finds the path gone
      # or another file there, and starts again (_acquire_local).
      with contextlib.suppress(FileNotFoundError):
        if os.stat(os.fspath(self.path)).st_ino == os.fstat(self._fd).st_ino:
          os.remove(os.fspath(self.path))
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    try:
      holder = self._read()
      if holder and holder.get("token") == self._token:
        self.path.unlink()
    except OSError as e:
      logging.warning("Cannot remove the lock %s (%s): it expires %.0fs after its last heartbeat.", self.path, e,
                      self.stale_after_s)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
