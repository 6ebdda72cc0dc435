"""Metrics to a JSON-lines file in the work directory, and to TensorBoard when installed.

``MetricWriter`` implements clu's ``MetricWriter`` interface (``write_scalars``,
``write_hparams``, ``flush``, ``close``, ...), so it goes wherever a clu writer goes (a
``clu.metric_writers.MultiWriter`` beside clu's ``SummaryWriter``, where TensorFlow is
installed). clu 0.0.12's ``metric_writers`` package imports TensorFlow, which emim does
not need, so the interface is matched (tests/test_metric_writer.py compares the two)
rather than inherited. TensorBoard event files are written with the ``tensorboard`` package's own
writer and protos (``pip install tensorboard``), without TensorFlow. With
``config.train.wandb_project`` set, the same scalars go to Weights & Biases too
(``pip install "emim[wandb]"``; ``wandb_run``).

One writer per job: only process 0 writes (``active``); the others' calls do nothing,
so a multi-host run's files hold each line once.

A remote work directory (``gs://``) cannot be appended to: the files are staged in a
local folder and uploaded whole, at most every ``sync_every_s`` seconds and on
``flush``/``close``. So that an upload stays small however long the run, the staged
TensorBoard event file is closed once it holds ``tb_file_bytes`` and a new one begun
(TensorBoard reads every event file of the folder, in order): each upload sends the
JSON lines and the current event file, never the run's whole event history again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any, Mapping

import numpy as np

from emim import fs

try:
  from tensorboard.compat.proto import event_pb2, summary_pb2
  from tensorboard.summary.writer.event_file_writer import EventFileWriter
except ImportError:  # TensorBoard is optional
  EventFileWriter = None

TENSORBOARD_DIR = "tensorboard"


class MetricWriter:
  """Writes {"step": s, name: value, ...} lines, and scalar events to ``tensorboard/``
  beside them when the tensorboard package is installed.

  Args:
    workdir: the run's work directory (local or remote).
    filename: the JSON-lines file, e.g. "metrics.jsonl" or "metrics_eval.jsonl".
    active: whether this process writes; default: process 0 of the job.
    sync_every_s: for a remote ``workdir``, the longest time between uploads.
    resume_step: the step a resumed run starts from: lines of later steps (written by
      the attempt that went past its last checkpoint before it died) and torn lines are
      dropped, so that every step's line appears once.
    tb_file_bytes: for a remote ``workdir``, the size at which the staged event file is
      uploaded a last time and a new one begun.
  """

  def __init__(self, workdir: fs.PathLike, filename: str = "metrics.jsonl", *, active: bool | None = None,
               sync_every_s: float = 30.0, resume_step: int | None = None, tb_file_bytes: int = 1 << 20,
               wandb_project: str = "", wandb_config: Mapping[str, Any] | None = None):
    if active is None:
      import jax  # deferred: the writer itself needs no JAX

      active = jax.process_index() == 0
    self.active = active
    self.path = fs.as_path(workdir) / filename
    self._remote = fs.is_remote(workdir)
    self._sync_every_s, self._last_sync = sync_every_s, time.monotonic()
    self._tb_file_bytes = tb_file_bytes
    self._file = self._tb = self._staging = self._wandb = None
    if not active:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    local_dir = os.fspath(self.path.parent)
    if self._remote:
      # Stage locally: the JSON lines continue the remote file, the event file is new.
      self._staging = fs.staging_dir("metrics")
      local_dir = self._staging
      if self.path.exists():
        with self.path.open("rb") as src, open(os.path.join(local_dir, filename), "wb") as dst:
          shutil.copyfileobj(src, dst)
    self._local_path = os.path.join(local_dir, filename)
    self._continue(resume_step)
    self._file = open(self._local_path, "a", encoding="utf-8")
    if EventFileWriter is not None:
      self._tb_dir = os.path.join(local_dir, TENSORBOARD_DIR)
      self._tb_suffix = f".{os.path.splitext(filename)[0]}"
      self._tb = EventFileWriter(self._tb_dir, filename_suffix=self._tb_suffix)
    else:
      logging.info("tensorboard not installed: metrics go to %s only.", self.path)
    if wandb_project:
      self._wandb = wandb_run(wandb_project, workdir, None if self._remote else local_dir, wandb_config)

  def _continue(self, resume_step: int | None) -> None:
    """Make the existing file end with a whole line, and (``resume_step``) drop the
    lines of steps after it."""
    if not os.path.exists(self._local_path):
      return
    with open(self._local_path, "rb") as f:
      data = f.read()
    if resume_step is None:
      if data and not data.endswith(b"\n"):
        with open(self._local_path, "ab") as f:
          f.write(b"\n")  # a torn last line stays apart from the next
      return
    kept = []
    for line in data.decode("utf-8", errors="replace").splitlines():
      try:
        if json.loads(line)["step"] <= resume_step:
          kept.append(line)
      except (ValueError, KeyError, TypeError):
        pass  # torn
    dropped = len(data.decode("utf-8", errors="replace").splitlines()) - len(kept)
    if dropped:
      logging.info("Dropped %d line(s) after step %d from %s: the resumed run writes those steps again.", dropped,
                   resume_step, self.path)
      fs.atomic_write_text(self._local_path, "".join(line + "\n" for line in kept))

  # --- clu's MetricWriter interface ----------------------------------------------------
  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.active:
      return
    values = {k: float(np.asarray(v)) for k, v in scalars.items()}
    self._file.write(json.dumps({"step": int(step), **values}) + "\n")
    self._file.flush()
    if self._wandb is not None:
      self._wandb.log(values, step=int(step))
    if self._tb is not None:
      summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
      self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
    if self._remote and time.monotonic() - self._last_sync > self._sync_every_s:
      self.flush()

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Recorded as ``hparams.json`` beside the metrics (the run's config.json holds them
    all already)."""
    if self.active:
      fs.atomic_write_text(self.path.parent / "hparams.json", json.dumps(dict(hparams), indent=2, default=str))

  def _unsupported(self, kind: str) -> None:
    logging.debug("emim's MetricWriter records scalars only; %s not written.", kind)

  def write_summaries(self, step, values, metadata=None):
    self._unsupported("summaries")

  def write_images(self, step, images):
    self._unsupported("images")

  def write_videos(self, step, videos):
    self._unsupported("videos")

  def write_audios(self, step, audios, *, sample_rate):
    self._unsupported("audios")

  def write_texts(self, step, texts):
    self._unsupported("texts")

  def write_histograms(self, step, arrays, num_buckets=None):
    self._unsupported("histograms")

  def flush(self) -> None:
    if not self.active:
      return
    self._file.flush()
    if self._tb is not None:
      self._tb.flush()
    if self._remote:
      self._upload()
    self._last_sync = time.monotonic()

  def close(self) -> None:
    if not self.active or self._file is None:
      return
    self._file.close()
    self._file = None  # (closed: _upload begins no new event file)
    if self._tb is not None:
      self._tb.close()
    if self._remote:
      self._upload()
      shutil.rmtree(self._staging, ignore_errors=True)
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None

  # --- emim's shorthand ------------------------------------------------------------------
  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    self.write_scalars(step, metrics)

  def _upload(self) -> None:
    """Each staged file, whole, to the remote work directory (an object store write is
    atomic: a reader sees the previous upload or this one); an event file that has
    reached ``tb_file_bytes`` is then closed, uploaded a last time and removed from the
    staging folder, and a new one begun."""
    with open(self._local_path, "rb") as f:
      fs.atomic_write_bytes(self.path, f.read())
    if self._tb is None or not os.path.isdir(self._tb_dir):
      return
    staged = self._upload_event_files()
    if self._file is not None and staged >= self._tb_file_bytes:  # (not while closing)
      self._tb.close()
      self._upload_event_files()
      for name in os.listdir(self._tb_dir):
        os.remove(os.path.join(self._tb_dir, name))
      self._tb = EventFileWriter(self._tb_dir, filename_suffix=self._tb_suffix)

  def _upload_event_files(self) -> int:
    """Upload the staged event files; returns their size in bytes."""
    remote_tb = self.path.parent / TENSORBOARD_DIR
    remote_tb.mkdir(parents=True, exist_ok=True)
    size = 0
    for name in os.listdir(self._tb_dir):
      with open(os.path.join(self._tb_dir, name), "rb") as f:
        data = f.read()
      size += len(data)
      fs.atomic_write_bytes(remote_tb / name, data)
    return size


def wandb_run(project: str, workdir: fs.PathLike, local_dir: str | None, config: Mapping[str, Any] | None):
  """A Weights & Biases run for the work directory (``pip install "emim[wandb]"``): one
  run per work directory, named after it, so that a resumed job continues the same W&B
  run (its id a hash of the directory's path). W&B's own environment variables apply:
  ``WANDB_MODE=offline`` keeps it on this disk (``wandb sync`` uploads it later),
  ``WANDB_ENTITY`` names the team. Its local files go to ``local_dir/wandb``."""
  import wandb  # the wandb extra; config_base.validate names it when missing

  where = fs.as_path(workdir)
  key = os.fspath(where) if fs.is_remote(where) else os.path.abspath(os.fspath(where))
  return wandb.init(project=project, name=where.name, id=hashlib.sha1(key.encode()).hexdigest()[:16], resume="allow",
                    config=dict(config or {}), dir=local_dir)


def read_metrics(path: fs.PathLike) -> list[dict]:
  """The JSON lines written by MetricWriter."""
  text = fs.as_path(path).read_text()
  return [json.loads(line) for line in text.splitlines() if line.strip()]
