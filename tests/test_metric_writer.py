"""Metrics reach the JSON-lines file and, without TensorFlow, TensorBoard event files;
the writer has clu's MetricWriter interface; only the job's writer writes."""

import ast
import importlib.util
import inspect
import pathlib

import numpy as np
import pytest

from emim.metric_writer import MetricWriter, read_metrics


def test_jsonl_and_tensorboard_events(tmp_path):
  writer = MetricWriter(tmp_path, active=True)
  writer.write(1, {"loss": np.float32(2.5), "mi": 0.25})
  writer.write_scalars(2, {"loss": 1.5})
  writer.write_hparams({"lr": 0.1})
  writer.close()
  assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 2.5, "mi": 0.25}, {"step": 2, "loss": 1.5}]
  assert (tmp_path / "hparams.json").read_text().strip().startswith("{")
  accumulator_module = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  acc = accumulator_module.EventAccumulator(str(tmp_path / "tensorboard"))
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 2.5), (2, 1.5)]
  # A second writer (a resumed run) continues the same file.
  writer = MetricWriter(tmp_path, active=True)
  writer.write(3, {"loss": 1.0})
  writer.close()
  assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_a_process_other_than_the_writer_writes_nothing(tmp_path):
  writer = MetricWriter(tmp_path / "run", active=False)
  writer.write(1, {"loss": 1.0})
  writer.write_hparams({"lr": 0.1})
  writer.flush()
  writer.close()
  assert not (tmp_path / "run").exists()


def test_has_every_method_of_clus_metric_writer_interface():
  """clu 0.0.12's metric_writers package imports TensorFlow, so emim matches the interface
  instead of inheriting it: the same abstract methods with the same parameters, read from
  clu's source."""
  spec = importlib.util.find_spec("clu")
  source = pathlib.Path(spec.origin).parent / "metric_writers" / "interface.py"
  tree = ast.parse(source.read_text())
  interface = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MetricWriter")
  abstract = [f for f in interface.body if isinstance(f, ast.FunctionDef)
              and any(getattr(d, "attr", getattr(d, "id", "")) == "abstractmethod" for d in f.decorator_list)]
  assert len(abstract) >= 9
  for method in abstract:
    ours = getattr(MetricWriter, method.name, None)
    assert ours is not None, method.name
    theirs = [a.arg for a in method.args.args + method.args.kwonlyargs]
    assert list(inspect.signature(ours).parameters) == theirs, method.name


def test_a_resumed_run_rewrites_the_steps_after_its_checkpoint_and_a_torn_line_stays_apart(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 2, "loss": 1.0}\n{"step": 4, "loss": 0.5}\n{"step": 6, "lo')  # died at 6, saved at 4
  writer = MetricWriter(tmp_path, active=True, resume_step=4)
  writer.write(6, {"loss": 0.25})
  writer.close()
  assert read_metrics(path) == [{"step": 2, "loss": 1.0}, {"step": 4, "loss": 0.5}, {"step": 6, "loss": 0.25}]
  other = tmp_path / "metrics_eval.jsonl"
  other.write_text('{"step": 2, "a": 1.0}\n{"step": 3, "a"')  # torn by a crash
  writer = MetricWriter(tmp_path, "metrics_eval.jsonl", active=True)
  writer.write(4, {"a": 2.0})
  writer.close()
  assert other.read_text().splitlines()[-1] == '{"step": 4, "a": 2.0}'
