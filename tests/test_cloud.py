"""A gs:// work directory is a run like a local one: train, resume, evaluate and export
there, against a GCS emulator on localhost (both gcsfs under etils.epath and TensorStore
under Orbax talk to it), so nothing lands on the local disk."""

import json
import os

import jax
import numpy as np
import pytest
from conftest import tiny_synthetic
from etils import epath

import emim
from emim import evaluate, export, train
from emim.backbone import load_run_config, restore_backbone
from emim.metric_writer import read_metrics


@pytest.mark.slow
def test_gs_workdir_trains_resumes_evaluates_and_exports_there(fake_gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # where a "gs:/bucket/run" folder would appear if a path were local
  run = f"{fake_gcs}/runs/synthetic"
  config = tiny_synthetic(**{"eval.every_steps": 4})
  train.run(config, run, stop_at_step=2)
  resumed = train.run(config, run)
  straight = train.run(config, str(tmp_path / "local"))
  for a, b in zip(jax.tree.leaves(jax.device_get(straight.state.params)), jax.tree.leaves(jax.device_get(resumed.state.params))):
    np.testing.assert_array_equal(a, b)

  remote = epath.Path(run)
  names = {p.name for p in remote.iterdir()}
  assert {"checkpoints", "config.json", "classes.json", "metrics.jsonl", "timings.json"} <= names
  assert "lock.json" not in names  # released
  assert {p.name for p in (remote / "checkpoints").iterdir()} >= {"2", "4"}
  rows = read_metrics(remote / "metrics.jsonl")  # staged locally, uploaded whole: each line once
  assert [r["step"] for r in rows if "loss" in r] == [2, 4]
  local_rows = read_metrics(tmp_path / "local" / "metrics.jsonl")
  assert [r["loss"] for r in rows if "loss" in r] == [r["loss"] for r in local_rows if "loss" in r]
  assert list((remote / "tensorboard").iterdir())
  assert load_run_config(run).model.width == config.model.width

  with config.unlocked():
    config.eval.probe_mode, config.eval.probe_epochs = "features", 1
  results = evaluate.evaluate(config, run)
  table = json.loads((remote / "evaluation.json").read_text())
  assert table["4"]["knn_top1_k20"] == results["knn_top1_k20"]
  assert read_metrics(remote / "metrics_eval.jsonl")[-1]["eval/knn_top1_k20"] == results["knn_top1_k20"]

  step, backbone = restore_backbone(run, config)
  exported = export.export_backbone(backbone, f"{fake_gcs}/exports/synthetic", {"step": step})
  model, features = emim.load_backbone(exported)
  images = np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), np.uint8)
  np.testing.assert_allclose(features(images), backbone.features_fn()(images), rtol=1e-6, atol=1e-6)
  assert not os.path.exists(tmp_path / "gs:"), "a gs:// path was taken for a local folder"
