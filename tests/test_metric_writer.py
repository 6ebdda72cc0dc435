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


def _wandb_records(path):
  """The records of a W&B transaction log (``run-ID.wandb``: a ":W&B" header, then
  LevelDB-log chunks in 32 KiB blocks, each a protobuf ``Record``)."""
  import struct

  from wandb.proto import wandb_internal_pb2

  data, records, chunk, pos, block = path.read_bytes(), [], b"", 7, 32768
  assert data[:4] == b":W&B"
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if kind == 0 and length == 0:
      break
    chunk += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # a whole record, or a record's last chunk
      record = wandb_internal_pb2.Record()
      record.ParseFromString(chunk)
      records.append(record)
      chunk = b""
  return records


def test_with_a_wandb_project_every_scalar_also_goes_to_weights_and_biases(tmp_path, monkeypatch):
  """Offline (WANDB_MODE=offline: no network): the run is named after the work directory,
  its id fixed by the directory's path (a resumed job continues it), the config recorded,
  and each written step's scalars logged at that step."""
  pytest.importorskip("wandb", reason="the wandb extra (pip install \".[wandb]\") is not installed")
  import json

  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  workdir = tmp_path / "run_a"
  writer = MetricWriter(workdir, active=True, wandb_project="emim-test", wandb_config={"train": {"batch_size": 32}})
  writer.write(2, {"loss": 1.5, "eval/mi_infonce": np.float32(0.25)})
  writer.write(4, {"loss": 1.25})
  writer.close()
  assert [r["step"] for r in read_metrics(workdir / "metrics.jsonl")] == [2, 4]  # the JSON lines as before
  (log,) = workdir.glob("wandb/offline-run-*/run-*.wandb")
  records = _wandb_records(log)
  (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
  assert run.project == "emim-test" and run.display_name == "run_a" and log.name == f"run-{run.run_id}.wandb"
  assert json.loads({u.key: u.value_json for u in run.config.update}["train"]) == {"batch_size": 32}
  history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item} for r in records
             if r.WhichOneof("record_type") == "history"]
  assert [{k: v for k, v in h.items() if not k.startswith("_") or k == "_step"} for h in history] == [
      {"loss": 1.5, "eval/mi_infonce": 0.25, "_step": 2}, {"loss": 1.25, "_step": 4}]
  again = MetricWriter(workdir, active=True, wandb_project="emim-test", resume_step=4)  # the same W&B run
  again.close()
  assert {p.name for p in workdir.glob("wandb/offline-run-*/run-*.wandb")} == {log.name}


def test_a_wandb_project_without_wandb_installed_is_one_line_naming_the_extra(monkeypatch):
  import importlib.util

  from conftest import tiny_synthetic

  from emim import config_base

  real = importlib.util.find_spec
  monkeypatch.setattr(config_base.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
  with pytest.raises(config_base.ConfigError, match=r"--config.train.wandb_project='emim' logs to Weights & Biases, "
                                                    r"which is not installed: pip install \"emim\[wandb\]\""):
    config_base.validate(tiny_synthetic(**{"train.wandb_project": "emim"}))
  config_base.validate(tiny_synthetic())  # off by default: nothing needed
