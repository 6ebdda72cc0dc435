"""The evaluation program and the export: linear probe and kNN from a training run's
checkpoint, deterministic re-runs, and the JAX/PyTorch export round trip."""

import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, load_config

import emim
from emim import evaluate, export, train
from emim import workdir as workdir_lib
from emim.backbone import load_run_config, restore_backbone
from emim.checkpoint import CheckpointError
from emim.data import sources
from emim.evaluators.knn import knn_accuracy
from emim.metric_writer import read_metrics


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """The synthetic default, shortened: 6 epochs of EMMI on 8 CPU devices."""
  workdir = tmp_path_factory.mktemp("run")
  config = load_config("synthetic", None)
  with config.unlocked():
    config.train.num_epochs, config.train.log_every = 6, 96
    config.eval.probe_epochs, config.eval.probe_mode = 8, "features"
  train.run(config, str(workdir))
  return config, workdir


@pytest.mark.slow
def test_synthetic_default_raises_the_mi_estimates(trained_run):
  """The embedded default, shortened: the MI tracked on a fixed batch goes clearly up, and
  the embedding spreads over more directions. (Its Gaussian estimate, of the 16 leading
  principal directions, moves little in these first steps of unit-norm embeddings:
  BENCHMARKS.md, the synthetic default.)"""
  _, workdir = trained_run
  rows = [r for r in read_metrics(workdir / "metrics.jsonl") if "eval/mi_infonce" in r]
  first, last = rows[0], rows[-1]
  assert first["step"] == 0 and last["step"] == 192
  assert last["eval/mi_infonce"] > first["eval/mi_infonce"] + 0.5
  assert last["eval/mi_dv"] > first["eval/mi_dv"] + 0.5
  assert last["eval/effective_rank"] > 3 * first["eval/effective_rank"]
  # The objective's own (surrogate) MI on the progress lines rises too (with the raw
  # projection, before unit-norm embeddings were EMMI's default, it fell).
  surrogate = [r["mi"] for r in read_metrics(workdir / "metrics.jsonl") if "mi" in r]
  assert len(surrogate) == 2 and surrogate[1] > surrogate[0] + 0.5, surrogate


@pytest.mark.slow
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


@pytest.mark.slow
def test_re_running_on_the_same_checkpoint_gives_the_same_numbers(trained_run):
  config, workdir = trained_run
  with config.unlocked():
    config.eval.probe_mode, config.eval.probe_epochs = "augmented", 1
  first = evaluate.evaluate(config, str(workdir), mode="all")
  second = evaluate.evaluate(config, str(workdir), mode="all")
  for key in ("linear_top1", "linear_top5", "knn_top1_k20", "knn_top1_k200"):
    assert first[key] == second[key], key


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_config_of_another_model_is_refused_before_restoring(trained_run):
  config, workdir = trained_run
  other = config.copy_and_resolve_references()
  with other.unlocked():
    other.model.width = 2 * config.model.width
  with pytest.raises(ValueError, match=r"another model .*width=16 in the run, 32 asked.*Leave out --config"):
    restore_backbone(workdir, other)


@pytest.mark.slow
def test_the_program_overrides_fields_of_the_runs_own_config(trained_run, tmp_path):
  """Without --config the checkpoint's own config is the config, and --config.x=... edits it."""
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
  assert result.returncode != 0 and "cannot apply --config.eval.probe_epoks" in result.stderr
  assert "Traceback" not in result.stderr
  result = subprocess.run([sys.executable, "-m", "emim.evaluate", f"--workdir={run}", "--checkpoint_step=abc"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
  assert result.returncode == 2 and "--checkpoint_step='abc': give a step number" in result.stderr
  assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_reads_the_latest_finished_checkpoint_while_one_is_being_written(trained_run):
  """Training saves asynchronously into '<step>.orbax-checkpoint-tmp-*' and renames it when
  done; an evaluation started meanwhile reads the newest finished step."""
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


@pytest.mark.slow
def test_export_round_trip_jax(trained_run, tmp_path, caplog):
  config, workdir = trained_run
  step, backbone = restore_backbone(workdir, config)
  out = export.export_backbone(backbone, tmp_path / "export", {"step": step})
  model, features = emim.load_backbone(out)
  images = sources.load(config.data, "test").images[:16]
  np.testing.assert_allclose(features(images), backbone.features_fn()(images), rtol=1e-6, atol=1e-6)
  assert features(images).shape == (16, model.feature_dim)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary left beside it
  # Float images are [0, 1]: the same features as uint8; 0-255 floats are refused, not
  # turned silently into features hundreds of times too large.
  assert images.dtype == np.uint8
  np.testing.assert_allclose(features(images.astype(np.float32) / 255), features(images), rtol=1e-5, atol=1e-5)
  with pytest.raises(export.ExportError, match=r"Float images must be in \[0, 1\]; these range from 0 to 2\d\d.*"
                                               r"look like 0-255: divide by 255"):
    features(images.astype(np.float32))
  # Images of another size than the training one: said once.
  size = model.image_size
  larger = np.tile(images, (1, 2, 2, 1))
  with caplog.at_level(logging.WARNING):
    features(larger)
    features(larger)
  said = [r.getMessage() for r in caplog.records if "this backbone was trained at" in r.getMessage()]
  assert said == [f"The images are {2 * size}x{2 * size}; this backbone was trained at {size}x{size}: they are "
                  f"centre-cropped to {size}x{size} (not resized). Features of images of the training size are those "
                  "the evaluation measured. (Said once.)"]


@pytest.mark.slow
def test_export_refuses_a_non_empty_directory_and_replaces_it_only_when_asked(trained_run, tmp_path):
  config, workdir = trained_run
  _, old = restore_backbone(workdir, config, 100)
  step, new = restore_backbone(workdir, config)
  out = export.export_backbone(old, tmp_path / "export", {"step": 100})
  before = {p.name: p.read_bytes() for p in out.iterdir()}
  with pytest.raises(export.ExportError, match="holds an earlier export.*Add --overwrite"):
    export.export_backbone(new, out, {"step": step})
  assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # another run's export is untouched
  export.export_backbone(new, out, {"step": step}, overwrite=True)
  assert json.loads((out / export.MODEL_FILE).read_text())["step"] == step
  loaded, _ = emim.load_backbone(out)
  np.testing.assert_array_equal(jax.tree.leaves(loaded.variables)[0], np.asarray(jax.tree.leaves(new.variables)[0]))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
  # A truncated backbone file is named, with the fix.
  data = (out / export.BACKBONE_FILE).read_bytes()
  (out / export.BACKBONE_FILE).write_bytes(data[: len(data) // 2])
  with pytest.raises(export.ExportError, match=r"backbone.msgpack .*truncated.*Export the run again"):
    emim.load_backbone(out)


@pytest.mark.slow
def test_overwrite_replaces_an_export_only_never_a_run_or_a_project(trained_run, tmp_path):
  config, workdir = trained_run
  _, backbone = restore_backbone(workdir, config)
  project = tmp_path / "project"
  project.mkdir()
  (project / "important.py").write_text("keep me")
  with pytest.raises(export.ExportError, match=r"not an emim export \(\['important.py'\]\).*Choose --output=.*emim_export"):
    export.export_backbone(backbone, project, overwrite=True)
  assert (project / "important.py").read_text() == "keep me"
  # Without --overwrite too, the advice is one that works (not --overwrite, refused above).
  with pytest.raises(export.ExportError) as refused:
    export.check_output(project, False)
  assert "--overwrite" not in str(refused.value) and f"Choose --output={project / 'emim_export'}" in str(refused.value)
  export.export_backbone(backbone, project / "emim_export")
  assert sorted(p.name for p in project.iterdir()) == ["emim_export", "important.py"]
  with pytest.raises(export.ExportError, match="is the run's work directory"):
    export.check_output(workdir, True, workdir)
  link = tmp_path / "link"
  link.symlink_to(export.export_backbone(backbone, tmp_path / "target"))
  out = export.export_backbone(backbone, link, {"step": 7}, overwrite=True)  # through a symlink: its target
  assert out == export.check_output(tmp_path / "target", True) and link.is_symlink()
  assert json.loads((link / export.MODEL_FILE).read_text())["step"] == 7


@pytest.mark.slow
def test_evaluate_reports_a_missing_run_and_takes_tuple_overrides(trained_run, tmp_path):
  _, workdir = trained_run
  missing = subprocess.run([sys.executable, "-m", "emim.evaluate", f"--workdir={tmp_path / 'nothere'}",
                            "--config.eval.probe_epochs=1"], capture_output=True, text=True, timeout=300, cwd=REPO)
  assert missing.returncode == 1 and "no checkpoint: --workdir must be a training run's" in missing.stderr
  assert "Unknown command line flag" not in missing.stderr and "Traceback" not in missing.stderr
  run = tmp_path / "run"
  shutil.copytree(workdir, run, ignore=shutil.ignore_patterns("evaluation.json"))
  # As a user runs it, JAX_PLATFORMS unset: where libtpu is installed (CI), reading the
  # checkpoint's config must not start JAX before the CPU is chosen, or libtpu's probe for
  # a TPU prints its errors first.
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  knn = subprocess.run([sys.executable, "-m", "emim.evaluate", f"--workdir={run}", "--mode=knn",
                        "--config.eval.knn_k=(5,)"], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
  assert knn.returncode == 0, knn.stderr[-2000:]
  assert "TPU_WORKER_HOSTNAMES" not in knn.stderr and "host bounds" not in knn.stderr, knn.stderr[:2000]
  assert "knn_top1_k5" in json.loads((run / "evaluation.json").read_text())["192"]
  zero = subprocess.run([sys.executable, "-m", "emim.evaluate", f"--workdir={run}", "--config.eval.probe_epochs=0"],
                        capture_output=True, text=True, timeout=300, cwd=REPO)
  assert zero.returncode == 1 and "error: --config.eval.probe_epochs=0: it must be a positive integer" in zero.stderr


@pytest.mark.slow
def test_evaluate_and_export_read_the_config_their_checkpoint_was_trained_with(trained_run, tmp_path):
  """A later start of the run (or an edited config.json) does not change what an earlier
  checkpoint holds: the programs rebuild the model from the checkpoint's own config."""
  config, workdir = trained_run
  run = tmp_path / "run"
  shutil.copytree(workdir, run, ignore=shutil.ignore_patterns("evaluation.json"))
  stale = json.loads((run / "config.json").read_text())
  stale["model"]["width"] = 2 * config.model.width  # as a failed attempt with another width once left it
  (run / "config.json").write_text(json.dumps(stale))
  assert load_run_config(run).model.width == config.model.width
  result = subprocess.run([sys.executable, "-m", "emim.export", f"--workdir={run}", f"--output={tmp_path / 'export'}"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
  assert result.returncode == 0, result.stderr[-2000:]
  meta = json.loads((tmp_path / "export" / export.MODEL_FILE).read_text())
  assert (meta["width"], meta["step"]) == (config.model.width, 192)
  emim.load_backbone(tmp_path / "export")
  again = subprocess.run([sys.executable, "-m", "emim.export", f"--workdir={run}", f"--output={tmp_path / 'export'}"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
  assert again.returncode == 1 and "error: --output" in again.stderr and "--overwrite" in again.stderr
  assert "Traceback" not in again.stderr


@pytest.mark.slow
def test_results_are_logged_first_and_a_read_only_workdir_is_refused_before_any_work(trained_run, tmp_path, caplog,
                                                                                   monkeypatch):
  config, workdir = trained_run
  with config.unlocked():
    config.eval.probe_mode, config.eval.probe_epochs = "features", 1
  # /proc cannot be written, even by root: refused at once, naming --results_dir.
  with pytest.raises(PermissionError, match=r"Cannot write the evaluation results to /proc/emim.*--results_dir"):
    evaluate.evaluate(config, "/proc/emim", mode="knn", random_init=True)
  # Elsewhere with --results_dir: the run's directory gets nothing.
  before = sorted(p.name for p in workdir.iterdir())
  results = evaluate.evaluate(config, str(workdir), mode="knn", results_dir=str(tmp_path / "results"))
  assert json.loads((tmp_path / "results" / "evaluation.json").read_text())["192"]["knn_top1_k20"] == results["knn_top1_k20"]
  assert sorted(p.name for p in workdir.iterdir()) == before
  # A write that fails after the work: the results are in the log already.
  def failing(path, value):
    raise OSError("disk full")

  monkeypatch.setattr(workdir_lib, "write_json", failing)
  with caplog.at_level(logging.INFO), pytest.raises(OSError, match="disk full"):
    evaluate.evaluate(config, str(workdir), mode="knn", results_dir=str(tmp_path / "results"))
  assert f"Evaluation of step 192: knn_top1_k20={results['knn_top1_k20']:.4f}" in caplog.text


def test_a_later_evaluation_of_the_same_step_keeps_the_earlier_results(tmp_path):
  """--mode=knn after a full evaluation adds to the step's entry: the probe's stay."""
  evaluate.record(tmp_path, {"step": 4, "linear_top1": 0.5, "knn_top1_k20": 0.4, "timings": {"linear_s": 9.0}})
  evaluate.record(tmp_path, {"step": 4, "knn_top1_k20": 0.45, "timings": {"knn_s": 1.0}})
  entry = json.loads((tmp_path / "evaluation.json").read_text())["4"]
  assert entry == {"step": 4, "linear_top1": 0.5, "knn_top1_k20": 0.45, "timings": {"linear_s": 9.0, "knn_s": 1.0}}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["evaluation.json", "metrics_eval.jsonl", "tensorboard"]


def test_evaluations_writing_at_once_each_land_and_leave_no_lock_file(tmp_path):
  """update_json's read-modify-write is serialised (an flock of the folder): writers at
  once lose no update, and no lock file stays in the work directory."""
  import threading
  import time

  from emim import workdir as workdir_lib

  (tmp_path / "evaluation.json.lock").write_text("")  # left by an earlier version

  def writer(name):
    for i in range(10):
      def add(table, key=f"{name}-{i}"):
        time.sleep(0.002)  # between the read and the write: where an unserialised update is lost
        table[key] = i
      workdir_lib.update_json(tmp_path / "evaluation.json", add)

  threads = [threading.Thread(target=writer, args=(n,)) for n in "abcd"]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(json.loads((tmp_path / "evaluation.json").read_text())) == 40
  assert [p.name for p in tmp_path.iterdir()] == ["evaluation.json"]
