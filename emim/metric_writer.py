"""Metrics to a JSON-lines file in the work directory, and to TensorBoard when installed."""

from __future__ import annotations

import json
import logging
import pathlib

import numpy as np


class MetricWriter:
  """Writes {"step": s, name: value, ...} lines; TensorBoard events only if TensorFlow is
  importable (pip install -e .[tf]), since the programs must run without it."""

  def __init__(self, workdir: str | pathlib.Path, filename: str = "metrics.jsonl"):
    self.path = pathlib.Path(workdir) / filename
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._file = open(self.path, "a", encoding="utf-8")
    self._tb = None
    try:
      import tensorflow as tf  # noqa: F401
      from clu import metric_writers

      self._tb = metric_writers.SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))
    except ImportError:
      logging.info("TensorFlow not installed: metrics go to %s only.", self.path)

  def write(self, step: int, metrics: dict) -> None:
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
    self._file.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._file.flush()
    if self._tb is not None:
      self._tb.write_scalars(int(step), scalars)

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(path: str | pathlib.Path) -> list[dict]:
  """The JSON lines written by MetricWriter."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
