"""Metrics to a JSON-lines file in the work directory, and to TensorBoard when installed.

TensorBoard event files are written with the ``tensorboard`` package's own writer and
protos, so TensorFlow is not needed (``pip install tensorboard``).
"""

from __future__ import annotations

import json
import logging
import pathlib
import time

import numpy as np

try:
  from tensorboard.compat.proto import event_pb2, summary_pb2
  from tensorboard.summary.writer.event_file_writer import EventFileWriter
except ImportError:  # TensorBoard is optional
  EventFileWriter = None


class MetricWriter:
  """Writes {"step": s, name: value, ...} lines, and scalar events to ``tensorboard/``
  beside them when the tensorboard package is installed."""

  def __init__(self, workdir: str | pathlib.Path, filename: str = "metrics.jsonl"):
    self.path = pathlib.Path(workdir) / filename
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._file = open(self.path, "a", encoding="utf-8")
    self._tb = None
    if EventFileWriter is not None:
      self._tb = EventFileWriter(str(pathlib.Path(workdir) / "tensorboard"), filename_suffix=f".{pathlib.Path(filename).stem}")
    else:
      logging.info("tensorboard not installed: metrics go to %s only.", self.path)

  def write(self, step: int, metrics: dict) -> None:
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
    self._file.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._file.flush()
    if self._tb is not None:
      summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()])
      self._tb.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(path: str | pathlib.Path) -> list[dict]:
  """The JSON lines written by MetricWriter."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
