"""Metrics reach the JSON-lines file and, without TensorFlow, TensorBoard event files."""

import numpy as np
import pytest

from emim.metric_writer import MetricWriter, read_metrics


def test_jsonl_and_tensorboard_events(tmp_path):
  writer = MetricWriter(tmp_path)
  writer.write(1, {"loss": np.float32(2.5), "mi": 0.25})
  writer.write(2, {"loss": 1.5})
  writer.close()
  assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 2.5, "mi": 0.25}, {"step": 2, "loss": 1.5}]
  accumulator_module = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  acc = accumulator_module.EventAccumulator(str(tmp_path / "tensorboard"))
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 2.5), (2, 1.5)]
