"""The evaluation program and the export: linear probe and kNN from a training run's
checkpoint, deterministic re-runs, and the JAX/PyTorch export round trip."""

import json
import pathlib

import jax
import numpy as np
import pytest

import emim
from emim.config_base import load_config_file
from emim import evaluate, export, train
from emim.backbone import restore_backbone
from emim.checkpoint import CheckpointError
from emim.data import sources
from emim.evaluators.knn import knn_accuracy
from emim.metric_writer import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name="synthetic", variant=None):
  return load_config_file(REPO / "configs" / f"{name}.py", variant)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """The synthetic default, shortened: 6 epochs of EMMI on 8 CPU devices."""
  workdir = tmp_path_factory.mktemp("run")
  config = load_config("synthetic")
  with config.unlocked():
    config.train.num_epochs, config.train.log_every = 6, 96
    config.eval.probe_epochs, config.eval.probe_mode = 8, "features"
  train.run(config, str(workdir))
  return config, workdir


def test_synthetic_default_raises_the_mi_estimates(trained_run):
  """The embedded default, shortened: the MI tracked on a fixed batch goes clearly up."""
  _, workdir = trained_run
  rows = [r for r in read_metrics(workdir / "metrics.jsonl") if "eval/mi_infonce" in r]
  first, last = rows[0], rows[-1]
  assert first["step"] == 0 and last["step"] == 192
  assert last["eval/mi_infonce"] > first["eval/mi_infonce"] + 0.2
  assert last["eval/mi_gaussian"] > first["eval/mi_gaussian"] + 0.2


def test_trained_backbone_beats_chance_and_a_random_one(trained_run):
  config, workdir = trained_run
  results = evaluate.evaluate(config, str(workdir))
  chance = 1.0 / config.data.num_classes
  assert results["step"] == 192
  assert results["linear_top1"] > 2.5 * chance, results
  assert results["knn_top1_k20"] > 2.5 * chance, results
  # A random ResNet's pooled features already separate these classes somewhat (about
  # 25% here, as random features do on real images); the trained one must do better.
  random = evaluate.evaluate(config, str(workdir), mode="linear", random_init=True)
  assert random["random_init"] and "knn_top1_k20" not in random
  assert results["linear_top1"] > random["linear_top1"] + 0.04, (results, random)
  # Both recorded in the work directory: the checkpoint keyed by step, the baseline apart.
  table = json.loads((workdir / "evaluation.json").read_text())
  assert table["192"]["linear_top1"] == results["linear_top1"]
  assert table["random_init"]["linear_top1"] == random["linear_top1"]
  with pytest.raises(ValueError, match="drop --checkpoint_step"):
    evaluate.evaluate(config, str(workdir), step=192, random_init=True)


def test_re_running_on_the_same_checkpoint_gives_the_same_numbers(trained_run):
  config, workdir = trained_run
  with config.unlocked():
    config.eval.probe_mode, config.eval.probe_epochs = "augmented", 1
  first = evaluate.evaluate(config, str(workdir), mode="all")
  second = evaluate.evaluate(config, str(workdir), mode="all")
  for key in ("linear_top1", "linear_top5", "knn_top1_k20", "knn_top1_k200"):
    assert first[key] == second[key], key


def test_restores_a_given_step_and_reports_missing_ones(trained_run):
  config, workdir = trained_run
  step, backbone = restore_backbone(workdir, config, 100)
  assert step == 100
  latest_step, latest = restore_backbone(workdir, config)
  assert latest_step == 192
  a = jax.tree.leaves(backbone.variables["params"])[0]
  b = jax.tree.leaves(latest.variables["params"])[0]
  assert not np.allclose(a, b)
  with pytest.raises(CheckpointError, match="step 7"):
    restore_backbone(workdir, config, 7)
  with pytest.raises(CheckpointError, match="train first"):
    restore_backbone(workdir / "nothing_here", config)


def test_a_config_of_another_model_is_refused_before_restoring(trained_run):
  config, workdir = trained_run
  other = config.copy_and_resolve_references()
  with other.unlocked():
    other.model.width = 2 * config.model.width
  with pytest.raises(ValueError, match=r"another model .*width=16 in the run, 32 asked.*Leave out --config"):
    restore_backbone(workdir, other)


def test_the_program_overrides_fields_of_the_runs_own_config(trained_run, tmp_path):
  """Without --config the run's config.json is the config, and --config.x=... edits it."""
  import shutil
  import subprocess
  import sys

  _, workdir = trained_run
  run = tmp_path / "run"  # a copy: this writes its own evaluation.json
  shutil.copytree(workdir, run, ignore=shutil.ignore_patterns("evaluation.json"))
  result = subprocess.run(
      [sys.executable, "-m", "emim.evaluate", f"--workdir={run}", "--mode=linear", "--random_init",
       "--config.eval.probe_mode=features", "--config.eval.probe_epochs=1"],
      capture_output=True, text=True, timeout=300, cwd=REPO)
  assert result.returncode == 0, result.stderr[-2000:]
  entry = json.loads((run / "evaluation.json").read_text())["random_init"]
  assert (entry["linear_mode"], entry["linear_epochs"]) == ("features", 1)
  result = subprocess.run(
      [sys.executable, "-m", "emim.evaluate", f"--workdir={run}", "--config.eval.probe_epoks=1"],
      capture_output=True, text=True, timeout=300, cwd=REPO)
  assert result.returncode != 0 and "probe_epoks" in result.stderr


def test_reads_the_latest_finished_checkpoint_while_one_is_being_written(trained_run):
  """Training saves asynchronously into '<step>.orbax-checkpoint-tmp-*' and renames it when
  done; an evaluation started meanwhile reads the newest finished step."""
  import shutil

  config, workdir = trained_run
  unfinished = workdir / "checkpoints" / "500.orbax-checkpoint-tmp-1795383294"
  shutil.copytree(workdir / "checkpoints" / "192" / "state", unfinished / "state")
  (unfinished / "state" / "_METADATA").write_bytes(b"")  # half written
  try:
    step, _ = restore_backbone(workdir, config)
    assert step == 192
  finally:
    shutil.rmtree(unfinished)


def test_knn_on_hand_made_features():
  # Two tight clusters: every test point takes its cluster's label.
  train_f = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
  train_l = np.array([0, 0, 1, 1])
  test_f = np.array([[1.0, 0.05], [0.05, 1.0]])
  acc = knn_accuracy(train_f, train_l, test_f, np.array([0, 1]), 2, ks=(1, 3))
  assert acc == {"knn_top1_k1": 1.0, "knn_top1_k3": 1.0}
  # k larger than the training set is clipped to it (all four vote, ties by weight).
  acc = knn_accuracy(train_f, train_l, test_f, np.array([0, 1]), 2, ks=(200,))
  assert acc == {"knn_top1_k4": 1.0}


def test_export_round_trip_jax(trained_run, tmp_path):
  config, workdir = trained_run
  step, backbone = restore_backbone(workdir, config)
  out = export.export_backbone(backbone, tmp_path / "export", {"step": step})
  model, features = emim.load_backbone(out)
  images = sources.load(config.data, "test").images[:16]
  np.testing.assert_allclose(features(images), backbone.features_fn()(images), rtol=1e-6, atol=1e-6)
  assert features(images).shape == (16, model.feature_dim)
