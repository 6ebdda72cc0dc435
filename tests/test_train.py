"""The training program end to end on 8 CPU devices: runs, resumes exactly, refuses bad
input with a clear error, and trains every registered method."""

import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emim.config_base import load_config_file
from emim import methods, train
from emim.checkpoint import CheckpointError, Checkpointer
from emim.metric_writer import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name="synthetic", variant="runlocal"):
  return load_config_file(REPO / "configs" / f"{name}.py", variant)


def tiny_synthetic(variant="runlocal", **overrides):
  config = load_config("synthetic", variant)
  with config.unlocked():
    config.train.num_steps, config.train.log_every = 4, 2
    for key, value in overrides.items():
      node = config
      *path, leaf = key.split(".")
      for p in path:
        node = node[p]
      node[leaf] = value
  return config


def params_of(state):
  return jax.tree.map(np.asarray, jax.device_get((state.params, state.batch_stats, state.target, state.opt_state, state.probe_params)))


def test_synthetic_run_writes_metrics_and_checkpoints(tmp_path):
  assert jax.device_count() == 8
  result = train.run(tiny_synthetic(**{"eval.every_steps": 2}), str(tmp_path))
  assert int(result.state.step) == 4
  assert np.isfinite(result.final_metrics["loss"])
  rows = read_metrics(tmp_path / "metrics.jsonl")
  steps = [r["step"] for r in rows if "loss" in r]
  assert steps == [2, 4]
  assert any("eval/mi_infonce" in r for r in rows)
  knn = [r for r in rows if "knn/knn_top1_k20" in r]
  assert [r["step"] for r in knn] == [2, 4] and 0.0 <= knn[-1]["knn/knn_top1_k20"] <= 1.0
  assert Checkpointer(tmp_path / "checkpoints").latest_step() == 4
  assert json.loads((tmp_path / "config.json").read_text())["method"]["name"] == "emmi"
  assert set(json.loads((tmp_path / "timings.json").read_text())) == {"decode_s", "compile_s", "eval_setup_s", "train_s"}
  # The state is replicated over the 8-device mesh and the batch was sharded over it.
  leaf = jax.tree.leaves(result.state.params)[0]
  assert len(leaf.sharding.device_set) == 8


def test_interrupted_run_resumes_to_the_same_parameters(tmp_path):
  config = tiny_synthetic()
  straight = train.run(config, str(tmp_path / "straight"))
  first = train.run(config, str(tmp_path / "interrupted"), stop_at_step=2)
  assert int(first.state.step) == 2
  resumed = train.run(config, str(tmp_path / "interrupted"))
  assert int(resumed.state.step) == 4
  for a, b in zip(jax.tree.leaves(params_of(straight.state)), jax.tree.leaves(params_of(resumed.state))):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(
      jax.device_get(straight.state.objective_state["marginal"]["v"]),
      jax.device_get(resumed.state.objective_state["marginal"]["v"]))

  # Training on from an earlier step where later checkpoints exist is refused, with the
  # fork that does it instead; the fork reproduces the run exactly.
  source_steps = Checkpointer(tmp_path / "straight" / "checkpoints").all_steps()
  assert source_steps[-2:] == [2, 4]  # (Orbax also saves a fresh run's first step)
  with config.unlocked():
    config.checkpoint.restore_step = 2
  with pytest.raises(CheckpointError, match="mix two runs.*init_from"):
    train.run(config, str(tmp_path / "straight"))
  with config.unlocked():
    config.checkpoint.init_from = str(tmp_path / "straight")
  forked = train.run(config, str(tmp_path / "fork"))
  assert int(forked.state.step) == 4 and Checkpointer(tmp_path / "fork" / "checkpoints").all_steps() == [3, 4]
  assert Checkpointer(tmp_path / "straight" / "checkpoints").all_steps() == source_steps  # the source is untouched
  for a, b in zip(jax.tree.leaves(params_of(straight.state)), jax.tree.leaves(params_of(forked.state))):
    np.testing.assert_array_equal(a, b)
  with config.unlocked():
    config.checkpoint.init_from = ""
  with pytest.raises(CheckpointError, match="holds no checkpoint.*init_from"):
    train.run(config, str(tmp_path / "empty"))  # a restore_step with nothing to restore


def test_batch_not_divisible_by_devices_names_the_fix(tmp_path):
  with pytest.raises(ValueError, match="multiple of 8"):
    train.run(tiny_synthetic(**{"train.batch_size": 36}), str(tmp_path))


def test_non_finite_loss_stops_the_run_and_keeps_checkpoints(tmp_path):
  config = tiny_synthetic(**{"optim.base_lr": 1e30, "optim.name": "sgd"})
  with pytest.raises(FloatingPointError, match="Non-finite"):
    train.run(config, str(tmp_path))


def test_unknown_method_variant_and_key_are_errors():
  with pytest.raises(ValueError, match="Unknown config variant 'byl'"):
    load_config("synthetic", "byl")
  config = load_config("synthetic")
  with pytest.raises(AttributeError):
    config.train.batchsize = 3  # locked: a typo is an error
  with pytest.raises(ValueError, match="Unknown method 'nope'"):
    methods.method_config("nope")


def test_loading_configs_and_programs_leaves_jax_unstarted():
  """jax.distributed.initialize() (multi-host) and XLA_FLAGS (deterministic GPU kernels)
  act only before JAX starts its backends: importing emim and loading every config must
  not start them. Checked by a flag set afterwards still taking effect."""
  code = f"""
import os, pathlib
from emim.config_base import load_config_file
for path in sorted(pathlib.Path({str(REPO)!r}, "configs").glob("*.py")):
  load_config_file(path)
import emim.main, emim.train, emim.evaluate, emim.export
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=3"
import jax
assert jax.device_count() == 3, jax.device_count()
"""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
  assert result.returncode == 0, result.stderr[-2000:]


def test_command_line_rejects_unknown_override(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "emim.main", f"--config={REPO}/configs/synthetic.py:runlocal",
       "--config.train.batchsize=3", f"--workdir={tmp_path}"],
      capture_output=True, text=True, timeout=300, cwd=REPO)
  assert result.returncode != 0
  assert "batchsize" in result.stderr


def test_every_registered_method_computes_a_finite_loss_with_its_needs():
  rng = np.random.default_rng(0)
  views = lambda: tuple(jnp.asarray(rng.normal(size=(16, 8)), jnp.float32) for _ in range(2))
  for name in methods.available():
    method = methods.make_method(methods.method_config(name))
    v = methods.Views(proj=views(), pred=views() if method.uses_predictor else None,
                      target=views() if method.uses_target else None)
    loss, _, metrics = method.loss(v, method.init_objective_state(8))
    assert np.isfinite(float(loss)) and metrics, name
    assert method.paradigm in ("emmi", "sdmi", "jmi")


def test_emmi_l2_normalize_makes_the_loss_blind_to_each_embeddings_scale():
  """normalize="l2" puts each embedding on the unit sphere before the statistics: rescaling
  any row of either view (online or target) leaves the loss unchanged; without it, the
  surrogate (beta a stopped constant of the previous scale) sees the change."""
  rng = np.random.default_rng(0)
  z = [jnp.asarray(rng.normal(size=(32, 8)), jnp.float32) for _ in range(4)]
  scales = jnp.asarray(rng.uniform(0.1, 10.0, size=(32, 1)), jnp.float32)
  for normalize, invariant in (("l2", True), ("none", False)):
    cfg = methods.method_config("emmi")
    cfg.normalize = normalize
    method = methods.make_method(cfg)
    state = method.init_objective_state(8)
    loss = lambda views: float(method.loss(views, state)[0])
    plain = loss(methods.Views(proj=(z[0], z[1]), target=(z[2], z[3])))
    scaled = loss(methods.Views(proj=(z[0] * scales, z[1]), target=(z[2], z[3] * scales[::-1])))
    assert np.isclose(plain, scaled, rtol=1e-4) == invariant, (normalize, plain, scaled)
  cfg = methods.method_config("emmi")
  cfg.normalize = "unit"
  with pytest.raises(ValueError, match="normalize 'unit'.*'none', 'l2'"):
    methods.make_method(cfg)


def test_cifar_recipe_gives_emmi_fewer_dimensions_than_samples_and_leaves_other_methods():
  """The CIFAR recipe runs after the method is chosen: EMMI gets a 64-d unit-norm embedding
  (every covariance of its loss full rank at batch 256); BYOL keeps its 512-d projector;
  runlocal still shrinks everything."""
  emmi = load_config("cifar10", None)
  assert emmi.method.name == "emmi" and emmi.method.normalize == "l2"
  assert emmi.model.projector_dims[-1] < emmi.train.batch_size
  byol = load_config("cifar10", "byol")
  assert tuple(byol.model.projector_dims) == (2048, 2048, 512) and "normalize" not in byol.method
  tiny = load_config("cifar100", "runlocal")
  assert tuple(tiny.model.projector_dims) == (64, 32) and tiny.train.batch_size == 32
  assert load_config("imagenet1k", "byol").method.target_momentum == 0.996


# One method per structure (EMA target + predictor, shared weights + predictor, EMA
# target without predictor, joint); emmi runs in every other test.
@pytest.mark.parametrize("name", ["byol", "simsiam", "moco", "barlow_twins"])
def test_methods_train_a_step(tmp_path, name):
  overrides = {"train.num_steps": 2, "checkpoint.async_save": False}
  if name == "moco":
    overrides["method.predictor"] = False  # MoCo v2's form; v3 (with predictor) is the default
  if name == "byol":
    overrides["model.dtype"] = "bfloat16"  # the network in bf16, every statistic in float32
  config = tiny_synthetic(f"{name},runlocal", **overrides)
  result = train.run(config, str(tmp_path))
  assert np.isfinite(result.final_metrics["loss"]), name
  method = methods.make_method(config.method)
  assert (result.state.target is not None) == method.uses_target
  assert ("predictor" in result.state.params) == method.uses_predictor
  # Parameters stay float32 whatever the compute dtype.
  assert {leaf.dtype for leaf in jax.tree.leaves(result.state.params)} == {jnp.dtype(jnp.float32)}


def test_cifar10_image_folder_trains_a_few_steps(tmp_path, cifar_archive):
  config = load_config("cifar10", "runlocal")
  with config.unlocked():
    config.data.path = str(cifar_archive)
    config.data.cache_dir = str(tmp_path / "cache")
    config.train.num_steps = 3
  result = train.run(config, str(tmp_path / "run"))
  assert int(result.state.step) == 3
  assert np.isfinite(result.final_metrics["loss"])
  assert list((tmp_path / "cache").glob("*.npz")), "the decoded archive is cached"



def test_sigterm_saves_the_step_reached_and_the_same_command_resumes(tmp_path):
  """A preempted job (SIGTERM) saves a checkpoint at the step it reached, wherever the
  save interval stands, and exits with 128 + SIGTERM; the run resumes from that step."""
  overrides = ["--config.train.num_steps=1000", "--config.train.log_every=1", "--config.checkpoint.every_steps=1000"]
  proc = subprocess.Popen(
      [sys.executable, "-m", "emim.main", f"--config={REPO}/configs/synthetic.py:runlocal", *overrides,
       f"--workdir={tmp_path}"], stderr=subprocess.PIPE, text=True, cwd=REPO)
  log = []
  for line in proc.stderr:  # wait until training is under way
    log.append(line)
    if " step 3/1000 " in line:
      break
  proc.send_signal(signal.SIGTERM)
  _, rest = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM, "".join(log) + rest
  assert "Run the same command to resume" in rest
  stopped = Checkpointer(tmp_path / "checkpoints").latest_step()
  assert 3 <= stopped < 1000
  config = tiny_synthetic(**{"train.num_steps": 1000, "checkpoint.every_steps": 1000})
  resumed = train.run(config, str(tmp_path), stop_at_step=stopped + 1)
  assert int(resumed.state.step) == stopped + 1


def test_corrupt_checkpoint_is_reported_and_left_in_place(tmp_path):
  config = tiny_synthetic()
  train.run(config, str(tmp_path), stop_at_step=2)
  metadata = tmp_path / "checkpoints" / "2" / "state" / "_METADATA"
  assert metadata.exists()
  metadata.write_bytes(b"\x00garbage")  # a torn write
  with pytest.raises(CheckpointError, match="left as it is.*restore_step"):
    train.run(config, str(tmp_path))
  assert (tmp_path / "checkpoints" / "2").is_dir()  # nothing already saved was deleted
