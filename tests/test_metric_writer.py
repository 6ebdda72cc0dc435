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


def test_a_remote_run_uploads_a_bounded_event_file_and_leaves_no_staging_behind(fake_gcs, tmp_path, monkeypatch):
  """On gs:// the staged event file is closed and a new one begun once it holds
  tb_file_bytes, so that no upload resends the whole history; TensorBoard reads every step
  back from the files. The staging folder goes at close, and one left by a process that
  died (kill -9) goes when the next writer stages."""
  import os
  import subprocess
  import sys
  import tempfile

  from etils import epath

  from emim import fs

  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  stale = pathlib.Path(tempfile.gettempdir()) / f"emim-metrics-{int(dead.stdout)}-left"
  stale.mkdir(exist_ok=True)
  uploads = []
  real_write = fs.atomic_write_bytes
  monkeypatch.setattr(fs, "atomic_write_bytes", lambda path, data: (uploads.append((str(path), len(data))),
                                                                     real_write(path, data)))
  run = f"{fake_gcs}/metric_writer_run"
  writer = MetricWriter(run, active=True, sync_every_s=0.0, tb_file_bytes=4000)
  assert not stale.exists()
  staging = writer._staging
  for step in range(1, 201):
    writer.write(step, {"loss": 1.0 / step, "mi": float(step)})
  writer.close()
  assert not os.path.exists(staging)
  events = [size for path, size in uploads if "/tensorboard/" in path]
  assert len({path for path, _ in uploads if "/tensorboard/" in path}) >= 3  # rotated
  assert max(events) < 4000 + 200  # at most one line's events past the threshold
  local = tmp_path / "tensorboard"
  local.mkdir()
  for remote_file in (epath.Path(run) / "tensorboard").iterdir():
    (local / remote_file.name).write_bytes(remote_file.read_bytes())
  accumulator_module = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  acc = accumulator_module.EventAccumulator(str(local))
  acc.Reload()
  assert [e.step for e in acc.Scalars("mi")] == list(range(1, 201))
  assert [r["step"] for r in read_metrics(epath.Path(run) / "metrics.jsonl")] == list(range(1, 201))
