"""The training program end to end on 8 CPU devices: runs, resumes exactly, refuses bad
input with a clear error, and trains every registered method."""

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, load_config, tiny_synthetic

from emim import backbone as backbone_lib
from emim import checkpoint as ckpt_lib
from emim import cli, evaluators, methods, sharding, train
from emim import objectives as O
from emim.checkpoint import CheckpointError, Checkpointer
from emim.config_base import ConfigError
from emim.data import sources
from emim.evaluators.knn import knn_accuracy
from emim.metric_writer import read_metrics
from emim.workdir import WorkdirBusy, WorkdirLock


def params_of(state):
  return jax.tree.map(np.asarray, jax.device_get((state.params, state.batch_stats, state.target, state.opt_state, state.probe_params)))


def assert_same_params(a, b):
  """Two runs' results (train.RunResult) hold the same training state."""
  for x, y in zip(jax.tree.leaves(params_of(a.state)), jax.tree.leaves(params_of(b.state))):
    np.testing.assert_array_equal(x, y)


def test_synthetic_run_writes_metrics_and_checkpoints(tmp_path, monkeypatch, caplog):
  assert jax.device_count() == 8
  config = tiny_synthetic(**{"eval.every_steps": 2, "train.profile_steps": (2, 3)})
  # A GPU's or TPU's allocator counts the memory held (a CPU's does not): as a GPU would.
  monkeypatch.setattr(train, "device_memory_peak", lambda: {"peak_device_memory_gib": 1.5,
                                                            "device_memory_limit_gib": 59.325})
  with caplog.at_level(logging.INFO):
    result = train.run(config, str(tmp_path))
  assert "Device memory: at most 1.50 GiB held on a device of the 59.33 GiB JAX may use there" in caplog.text
  assert int(result.state.step) == 4
  assert np.isfinite(result.final_metrics["loss"])
  rows = read_metrics(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in rows if "loss" in r] == [2, 4]  # each progress line once
  assert [r["step"] for r in rows if "eval/mi_infonce" in r] == [0, 2, 4]
  assert all(r["refused_updates"] == 0 for r in rows if "loss" in r)
  # The periodic kNN is that of the checkpoint's backbone on the same fixed subsets.
  knn = [r for r in rows if "knn/knn_top1_k20" in r]
  assert [r["step"] for r in knn] == [2, 4]
  train_set = sources.load(config.data, "train")
  test_set = sources.load(config.data, "test")
  subset = lambda d, n: np.random.default_rng(0).permutation(len(d))[:n]
  tr, te = subset(train_set, config.eval.knn_train_subset), subset(test_set, config.eval.knn_test_subset)
  _, backbone = backbone_lib.restore_backbone(tmp_path, config, 4)
  features = backbone.features_fn()
  expected = knn_accuracy(backbone_lib.extract_features(features, train_set.images[tr], 64), train_set.labels[tr],
                          backbone_lib.extract_features(features, test_set.images[te], 64), test_set.labels[te],
                          10, tuple(config.eval.knn_k), config.eval.knn_temperature)
  assert knn[-1]["knn/knn_top1_k20"] == pytest.approx(expected["knn_top1_k20"], abs=1.5 / len(te))
  # Files: the config (also inside each checkpoint), the classes, the timings.
  # Every checkpoint.every_steps (2) steps and at the end; no extra one at step 1.
  assert Checkpointer(tmp_path / "checkpoints").all_steps() == [2, 4]
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["method"]["name"] == "emmi" and saved["train"]["log_every"] == 2
  assert ckpt_lib.restore_config(tmp_path / "checkpoints", 4) == (4, saved)
  assert json.loads((tmp_path / "classes.json").read_text()) == {"train": [f"class_{i}" for i in range(10)]}
  timings = json.loads((tmp_path / "timings.json").read_text())
  assert set(timings) == {"decode_s", "compile_s", "eval_setup_s", "train_s", "evaluators_s", "checkpoint_s",
                          "peak_device_memory_gib", "device_memory_limit_gib"}
  assert timings["peak_device_memory_gib"] == 1.5
  assert timings["evaluators_s"] + timings["checkpoint_s"] < timings["train_s"]
  WorkdirLock(tmp_path).acquire().release()  # released at the end
  assert list((tmp_path / "profile").rglob("*.xplane.pb")), "the trace of steps 2-3"
  # The state is replicated over the 8-device mesh and the batch was sharded over it.
  leaf = jax.tree.leaves(result.state.params)[0]
  assert len(leaf.sharding.device_set) == 8


def test_device_memory_peak_is_the_largest_of_the_devices_and_nothing_on_a_cpu(monkeypatch):
  assert train.device_memory_peak() == {}  # this CPU's devices keep no count
  stats = [{"peak_bytes_in_use": 3 * 2**30, "bytes_limit": 60 * 2**30}, {"peak_bytes_in_use": 5 * 2**29,
                                                                          "bytes_limit": 60 * 2**30}, None]
  devices = [types.SimpleNamespace(memory_stats=lambda s=s: s) for s in stats]
  monkeypatch.setattr(jax, "local_devices", lambda: devices)
  assert train.device_memory_peak() == {"peak_device_memory_gib": 3.0, "device_memory_limit_gib": 60.0}
  only_peak = types.SimpleNamespace(memory_stats=lambda: {"peak_bytes_in_use": 2**30})
  monkeypatch.setattr(jax, "local_devices", lambda: [only_peak])
  assert train.device_memory_peak() == {"peak_device_memory_gib": 1.0}  # no limit reported: none said


@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_parameters(tmp_path, monkeypatch):
  from emim import compiled

  compiled.clear()  # (programs of earlier tests of this config)
  compiles = []
  real_compile = train.compile_train_step
  monkeypatch.setattr(train, "compile_train_step", lambda *args: compiles.append(args) or real_compile(*args))
  config = tiny_synthetic()
  straight = train.run(config, str(tmp_path / "straight"))
  first = train.run(config, str(tmp_path / "interrupted"), stop_at_step=2)
  assert int(first.state.step) == 2
  resumed = train.run(config, str(tmp_path / "interrupted"))
  assert int(resumed.state.step) == 4
  assert_same_params(straight, resumed)
  assert len(compiles) == 1  # the same config in one process: its programs compiled once (emim.compiled)
  np.testing.assert_array_equal(
      jax.device_get(straight.state.objective_state["marginal"]["v"]),
      jax.device_get(resumed.state.objective_state["marginal"]["v"]))

  # Training on from an earlier step where later checkpoints exist is refused, with the
  # fork that does it instead; the fork reproduces the run exactly.
  source_steps = Checkpointer(tmp_path / "straight" / "checkpoints").all_steps()
  assert source_steps == [2, 4]
  with config.unlocked():
    config.checkpoint.restore_step = 2
  with pytest.raises(CheckpointError, match="mix two runs.*init_from"):
    train.run(config, str(tmp_path / "straight"))
  with config.unlocked():
    config.checkpoint.init_from = str(tmp_path / "straight")
    config.train.log_every = 1
  forked = train.run(config, str(tmp_path / "fork"))
  assert len(compiles) == 2  # another config (log_every, restore_step): compiled anew
  assert int(forked.state.step) == 4 and Checkpointer(tmp_path / "fork" / "checkpoints").all_steps() == [4]
  assert Checkpointer(tmp_path / "straight" / "checkpoints").all_steps() == source_steps  # the source is untouched
  assert_same_params(straight, forked)
  # The logged metrics are the interval's means (schedules: the last step's value): the
  # fork, logging every step, gives the per-step values of the same training.
  per_step = {r["step"]: r for r in read_metrics(tmp_path / "fork" / "metrics.jsonl") if "loss" in r}
  interval = {r["step"]: r for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "loss" in r}
  assert sorted(per_step) == [3, 4]
  for name in ("loss", "grad_norm", "probe_acc"):
    np.testing.assert_allclose(interval[4][name], (per_step[3][name] + per_step[4][name]) / 2, rtol=1e-5)
  for name in ("lr", "param_norm"):
    np.testing.assert_allclose(interval[4][name], per_step[4][name], rtol=1e-6)
  with config.unlocked():
    config.checkpoint.init_from = ""
  with pytest.raises(CheckpointError, match="holds no checkpoint.*init_from"):
    train.run(config, str(tmp_path / "empty"))  # a restore_step with nothing to restore


@pytest.mark.slow
def test_refused_updates_stop_the_run_only_in_a_row_and_its_checkpoint_resumes(tmp_path):
  """A non-finite update is refused (the state stays as it was) and counted per logging
  interval; max_nonfinite_in_a_row refusals in a row stop the run. The checkpoints hold
  the last finite parameters, and a resume with a workable learning rate trains on."""
  off = {"eval.mi_every_steps": 0}  # (no MI tracker: each config here would compile its own)
  broken = tiny_synthetic(**{"optim.name": "sgd", "optim.base_lr": float("nan"), "train.num_steps": 8,
                             "train.max_nonfinite_in_a_row": 4, "checkpoint.every_steps": 1, **off})
  with pytest.raises(FloatingPointError, match=r"4 updates in a row were refused, up to step 4.*those of step 0"):
    train.run(broken, str(tmp_path))
  rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
  assert [(r["step"], r["refused_updates"], r["refused_in_a_row_max"]) for r in rows] == [(2, 2.0, 2.0), (4, 2.0, 4.0)]
  assert np.isnan(rows[0]["loss"])  # no finite step to average
  assert Checkpointer(tmp_path / "checkpoints").all_steps() == [1, 2, 3]  # the 4th stopped the run
  _, fresh = ckpt_lib.restore_subtree(tmp_path / "checkpoints", 1, ("params",))
  _, saved = ckpt_lib.restore_subtree(tmp_path / "checkpoints", 3, ("params", "refused_in_a_row"))
  for a, b in zip(jax.tree.leaves(fresh["params"]), jax.tree.leaves(saved["params"])):
    np.testing.assert_array_equal(a, b)  # refused updates left the parameters as they were
  assert int(saved["refused_in_a_row"]) == 3

  fixed = tiny_synthetic(**{"optim.name": "sgd", "optim.base_lr": 0.05, "train.num_steps": 8, "checkpoint.every_steps": 2,
                            **off})
  resumed = train.run(fixed, str(tmp_path))
  assert int(resumed.state.step) == 8 and int(resumed.state.refused_in_a_row) == 0
  rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
  # Step 4's line of the stopped attempt (after its last checkpoint, 3) gave way to the resumed run's.
  assert [(r["step"], r["refused_updates"]) for r in rows] == [(2, 2.0), (4, 0.0), (6, 0.0), (8, 0.0)]
  assert np.isfinite(resumed.final_metrics["loss"])
  moved = jax.tree.leaves(jax.device_get(resumed.state.params))[0]
  assert not np.array_equal(moved, jax.tree.leaves(fresh["params"])[0])


def test_bad_values_are_refused_before_any_work_naming_the_field(tmp_path):
  with pytest.raises(ConfigError, match="multiple of 8"):
    train.run(tiny_synthetic(**{"train.batch_size": 36}), str(tmp_path))
  for field, value, message in [
      ("train.batch_size", 0, r"train.batch_size=0: it must be a positive integer"),
      ("train.batch_size", -8, r"train.batch_size=-8"),
      ("model.projector_dims", (), r"model.projector_dims=\(\): give the width of every layer"),
      ("train.num_steps", -1, r"train.num_steps=-1 .*set one of them"),
      ("train.profile_steps", (3, 2), r"train.profile_steps=\(3, 2\): give \(first, last\) steps"),
      ("model.width", 0, r"model.width=0: it must be a positive integer"),
      ("data.image_size", 0, r"data.image_size=0"),
      ("optim.base_lr", -1.0, r"base_lr=-1.0: a learning rate cannot be negative"),
      ("eval.mi_every_steps", -5, r"mi_every_steps=-5: -1 \(with every progress line\), 0 \(off\)"),
      ("eval.every_steps", -1, r"eval.every_steps=-1: 0 \(off\) or a number of steps"),
      ("data.source", "synthetc", r"data.source='synthetc': choose one of synthetic, image_folder"),
      ("model.backbone", "resnet99", r"model.backbone='resnet99': choose one of .*resnet18"),
      ("optim.name", "adam", r"optim.name='adam': choose one of lars, sgd, adamw"),
      ("model.dtype", "fp8", r"model.dtype='fp8': choose one of"),
  ]:
    with pytest.raises(ConfigError, match=message):
      train.run(tiny_synthetic(**{field: value}), str(tmp_path / "refused"))
  assert not (tmp_path / "refused").exists()  # refused before anything was written
  with pytest.raises(ConfigError, match="fewer than one batch of 1024.*batch_size"):
    train.run(tiny_synthetic(**{"train.batch_size": 1024}), str(tmp_path / "small"))
  (tmp_path / "a_file").write_text("")
  with pytest.raises(NotADirectoryError, match="--workdir .*a_file is a file, not a directory"):
    train.run(tiny_synthetic(), str(tmp_path / "a_file"))
  with pytest.raises(NotADirectoryError, match="a part of that path is a file"):
    train.run(tiny_synthetic(), str(tmp_path / "a_file" / "run"))
  # A name longer than the file system allows: the command line's one line names it.
  with pytest.raises(OSError) as too_long:
    train.run(tiny_synthetic(), str(tmp_path / ("a" * 300)))
  assert "is longer than the file system allows (300 bytes" in cli.explain(too_long.value)


def test_a_finished_run_asked_for_fewer_steps_says_so_and_changes_nothing(tmp_path, monkeypatch, caplog):
  """Re-running a finished work directory with a smaller num_steps (or the same) trains
  nothing, compiles nothing and rewrites no file (its timings stay the run's)."""
  train.run(tiny_synthetic(), str(tmp_path))
  files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

  def no_compile(*args, **kwargs):
    raise AssertionError("compiled the train step of a finished run")

  monkeypatch.setattr(train, "compile_train_step", no_compile)
  monkeypatch.setattr(train, "make_evaluators", no_compile)
  for steps in (2, 4):
    with caplog.at_level("WARNING"):
      result = train.run(tiny_synthetic(**{"train.num_steps": steps}), str(tmp_path))
    assert result.nothing_to_do and int(result.state.step) == 4
    assert f"already finished at step 4; this command asks for {steps} steps (--config.train.num_steps={steps}): " \
           "nothing to train, no file changed" in caplog.text
  assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files


def test_a_stop_signal_is_honoured_within_two_steps_and_a_second_ends_at_once():
  """The loop keeps at most two steps in flight on every backend (a stop waits for no
  more); the first SIGINT/SIGTERM is a request, after which both signals' action is the
  kernel's default, so a second one ends the process even while it waits on a step."""
  assert train.DispatchWindow.for_backend().limit == 2
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signal handlers are the main thread's")
  for signum in (signal.SIGINT, signal.SIGTERM):
    before = signal.getsignal(signum)
    with train.StopRequest(second_ends_process=True) as stop:  # the command line's
      os.kill(os.getpid(), signum)
      assert stop.signum == signum
      assert signal.getsignal(signal.SIGINT) == signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signum) == before
    with train.StopRequest() as stop:  # in a notebook: a second interrupt is KeyboardInterrupt, not the kernel's end
      os.kill(os.getpid(), signum)
      assert stop.signum == signum and signal.getsignal(signum) == before


def test_resuming_with_another_model_names_the_fields_not_a_corrupt_checkpoint(tmp_path):
  train.run(tiny_synthetic(), str(tmp_path), stop_at_step=2)
  with pytest.raises(CheckpointError, match=r"holds another model than this config describes \(model.width: 8 in "
                                            r"the checkpoint, 16 now\)"):
    train.run(tiny_synthetic(**{"model.width": 16}), str(tmp_path))
  with pytest.raises(CheckpointError, match=r"method.name: 'emmi' in the checkpoint, 'byol' now"):
    train.run(tiny_synthetic("byol,runlocal"), str(tmp_path))
  assert Checkpointer(tmp_path / "checkpoints").all_steps()[-1] == 2  # nothing moved or lost


@pytest.mark.slow
def test_a_dataset_without_a_test_split_is_reported_before_compiling(tmp_path, folder):
  import shutil

  only_train = tmp_path / "only_train"
  shutil.copytree(folder / "train", only_train / "train")
  config = tiny_synthetic(**{"data.source": "image_folder", "data.path": str(only_train), "data.num_classes": 4,
                             "data.decode_size": 16, "eval.every_steps": 2, "train.batch_size": 16})
  with pytest.raises(sources.DatasetError, match="No split 'test'.*set --config.eval.every_steps=0"):
    train.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "config.json").exists()  # nothing recorded for an attempt that never trained
  with config.unlocked():
    config.eval.every_steps = 0
  assert int(train.run(config, str(tmp_path / "run")).state.step) == 4


def test_unknown_method_variant_and_key_are_errors():
  with pytest.raises(ValueError, match="Unknown config variant 'byl'"):
    load_config("synthetic", "byl")
  config = load_config("synthetic")
  with pytest.raises(AttributeError):
    config.train.batchsize = 3  # locked: a typo is an error
  with pytest.raises(ValueError, match="Unknown method 'nope'"):
    methods.method_config("nope")


def test_load_config_file_takes_the_command_lines_path_and_variants(tmp_path):
  """``load_config_file("configs/cifar10.py:byol,runlocal")``, as --config= spells it, is
  the config of the path and variants given apart; a missing file, a file without
  get_config and variants given twice are one-line ConfigErrors."""
  from emim.config_base import load_config_file

  path = REPO / "configs" / "cifar10.py"
  joined = load_config_file(f"{path}:byol,runlocal")
  assert joined.method.name == "byol" and joined.train.batch_size == 32
  assert joined.to_json() == load_config_file(path, "byol,runlocal").to_json()
  assert load_config_file(f"{path}:").method.name == "emmi"
  with pytest.raises(ConfigError, match=r"config file .*nope\.py does not exist"):
    load_config_file(f"{tmp_path}/nope.py:byol")
  (tmp_path / "empty.py").write_text("x = 1\n")
  with pytest.raises(ConfigError, match="defines no get_config"):
    load_config_file(tmp_path / "empty.py")
  with pytest.raises(ConfigError, match="given twice"):
    load_config_file(f"{path}:byol", "runlocal")
  with pytest.raises(ConfigError, match="is a folder"):
    load_config_file(REPO / "configs")
  (tmp_path / "settings.cfg").write_text("def get_config(arg=None): pass\n")
  with pytest.raises(ConfigError, match="not a Python config file"):
    load_config_file(tmp_path / "settings.cfg")


def test_loading_configs_imports_no_jax_and_programs_leave_it_unstarted():
  """Configs import no JAX at all; importing the programs imports it but must not start
  its backends: jax.distributed.initialize() (multi-host) and XLA_FLAGS (deterministic
  GPU kernels) act only before. Checked by a flag set afterwards still taking effect."""
  code = f"""
import os, pathlib, sys
from emim.config_base import load_config_file
for path in sorted(pathlib.Path({str(REPO)!r}, "configs").glob("*.py")):
  load_config_file(path)
assert not [m for m in sys.modules if m == "jax" or m.startswith("jax.")], "a config imported JAX"
import emim.main, emim.train, emim.evaluate, emim.export
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=3"
import jax
assert jax.device_count() == 3, jax.device_count()
"""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
  assert result.returncode == 0, result.stderr[-2000:]


def test_a_multi_device_cpu_run_keeps_few_steps_in_flight_and_so_never_deadlocks():
  """XLA's CPU client deadlocks some 40 multi-device programs dispatched ahead (every pool
  thread holds a launch waiting for an in-flight slot, or a collective's participant
  waiting for one that cannot get a thread): the suite's hang. The training loop's
  DispatchWindow keeps 8 in flight there; 100 all-reduce steps dispatched through it
  finish (in a child process with 10-second collective timeouts: a deadlock aborts it)."""
  import importlib.util

  assert train.DispatchWindow.for_backend().limit <= train.DispatchWindow.CPU_LIMIT  # these tests' 8 CPU devices
  spec = importlib.util.spec_from_file_location("deadlock", REPO / "benchmarks" / "xla_cpu_inflight_deadlock.py")
  deadlock = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(deadlock)
  outcome, line = deadlock.run(steps=100, window=train.DispatchWindow.CPU_LIMIT, timeout_s=10)
  assert outcome == "finished", line


def test_command_line_errors_are_one_message_naming_the_fix(tmp_path):
  def main(*args):
    return subprocess.run([sys.executable, "-m", "emim.main", f"--config={REPO}/configs/synthetic.py:runlocal", *args,
                           f"--workdir={tmp_path}"], capture_output=True, text=True, timeout=300, cwd=REPO)

  typo = main("--config.train.batchsize=3")
  assert typo.returncode == 2
  assert 'cannot apply --config.train.batchsize: \'batchsize\' Did you mean "batch_size"' in typo.stderr
  assert "Traceback" not in typo.stderr and len(typo.stderr.strip().splitlines()) <= 3, typo.stderr
  zero = main("--config.train.batch_size=0")
  assert zero.returncode == 1 and "error: --config.train.batch_size=0: it must be a positive integer" in zero.stderr
  assert "Traceback" not in zero.stderr


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
  with pytest.raises(ConfigError, match="normalize='unit': choose one of none, l2"):
    methods.make_method(cfg)


def test_emmi_eigenvalue_momentum_moves_the_tracked_lambda_max_once_per_step_with_a_target():
  """method.eig_momentum = m means lam <- m lam + (1 - m) lambda_max(batch) once per step,
  with a momentum target (two view-swapped halves) as without one: checked against
  lambda_max from eigvalsh of each half's statistics (power iteration run to convergence)."""
  rng = np.random.default_rng(0)
  z1, z2, t1, t2 = (jnp.asarray(rng.normal(size=(64, 6)) * [4, 2, 1, 1, 1, 1], jnp.float32) for _ in range(4))
  m, previous = 0.9, 1000.0
  cfg = methods.method_config("emmi")
  cfg.eig_momentum, cfg.power_iters, cfg.normalize = m, 300, "none"

  def lambda_max(a, b):  # of each symmetric-form statistic of the pair (a, b)
    factors = O.covariance_factors(a, b, "symmetric")
    return {k: float(np.linalg.eigvalsh(np.asarray(x.T @ x, np.float64))[-1]) + cfg.eps for k, x in factors.items()}

  for target in (True, False):
    cfg.target = target
    method = methods.make_method(cfg)
    state = jax.tree.map(lambda x: x, method.init_objective_state(6))
    for term in state.values():
      term["lam"] = jnp.float32(previous)
    views = methods.Views(proj=(z1, z2), target=(t1, t2) if target else None)
    _, new_state, _ = method.loss(views, state)
    halves = [lambda_max(z1, t2), lambda_max(z2, t1)] if target else [lambda_max(z1, z2)]
    for term in ("marginal", "sum", "diff"):
      batch = np.mean([h[term] for h in halves])
      np.testing.assert_allclose(float(new_state[term]["lam"]), m * previous + (1 - m) * batch, rtol=1e-4,
                                 err_msg=f"target={target}, {term}")


def test_cifar_recipe_gives_emmi_fewer_dimensions_than_samples_and_leaves_other_methods():
  """The CIFAR recipe runs after the method is chosen: EMMI gets a 64-d unit-norm embedding
  (every covariance of its loss full rank at batch 256); BYOL keeps its 512-d projector;
  runlocal still shrinks everything."""
  emmi = load_config("cifar10", None)
  assert emmi.method.name == "emmi" and emmi.method.normalize == "l2"
  assert emmi.model.projector_dims[-1] < emmi.train.batch_size
  synthetic = load_config("synthetic", None)  # the README's first command: EMMI as recommended
  assert synthetic.method.normalize == "l2" and synthetic.model.projector_dims[-1] < synthetic.train.batch_size
  byol = load_config("cifar10", "byol")
  assert tuple(byol.model.projector_dims) == (2048, 2048, 512) and "normalize" not in byol.method
  tiny = load_config("cifar100", "runlocal")
  assert tuple(tiny.model.projector_dims) == (64, 32) and tiny.train.batch_size == 32
  assert load_config("imagenet1k", "byol").method.target_momentum == 0.996


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cifar10", "imagenet1k"])
def test_the_real_configs_train_step_lowers_for_8_devices(name):
  """The configs users run (ResNet-18 on CIFAR-10 from device-resident data; ResNet-50 at
  224x224 in bf16, streamed, global batch 1024), for 8 devices from shapes: each traced
  and lowered to one program over the 8 devices, its batch split over them and the state
  kept replicated. (XLA's compile of them is left out for the suite's time, about 20 s for
  ResNet-18 and a minute for ResNet-50 on 2 cores, so no CI test compiles these two
  configs: python -m emim.aot compiles them for TPU slices, tests/test_aot.py
  the runlocal models, and the other tests compile and run tiny ResNets through the same
  function.)"""
  from emim.data.pipeline import DataShapes

  config = load_config(name, None)
  mesh = sharding.make_mesh()
  replicated = sharding.replicated(mesh)
  data = DataShapes(config, mesh, 50000)  # the shapes of DeviceData's or StreamData's input, no data
  parts = train.build_parts(config, config.data.num_classes, 50000 // config.train.batch_size, 100)
  abstract, state_sharding = train.state_shapes(parts, mesh)
  state = ckpt_lib.abstract_like(abstract, state_sharding)
  lowered, _ = train.lower_train_step(parts, data, state, state_sharding, mesh)
  text = lowered.as_text()
  assert "mhlo.num_partitions = 8" in text
  assert lowered.out_info[0].step.sharding == replicated  # the state stays replicated
  if name == "imagenet1k":
    batch = jax.tree.leaves(data.example_input())[0]
    assert batch.shape[0] == config.train.batch_size and batch.sharding == sharding.batch_sharding(mesh)
    assert '[{"data"}' in text  # an argument split along the data axis
  else:  # the whole training set on every device, as rows, gathered from there each step
    images = data.example_input()["images"]
    assert images.shape == (50000, 32 * 32 * 3) and images.sharding == replicated


def test_evaluators_come_from_the_registry_and_run_at_their_own_cadence(tmp_path, monkeypatch):
  """The loop knows no evaluator by name: one registered for the test runs every 3 steps,
  at the last step, and (at_start) before the first, with the state of that step."""
  seen = []

  class StepProbe:
    name, every_steps, at_start = "probe", 3, True

    def run(self, state):
      seen.append(int(state.step))
      return {"probe/step": float(state.step)}

  monkeypatch.setitem(evaluators._BUILDERS, "probe", lambda config, context: StepProbe())
  train.run(tiny_synthetic(**{"train.num_steps": 7, "eval.mi_every_steps": 0}), str(tmp_path))
  assert seen == [0, 3, 6, 7]
  rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "probe/step" in r]
  assert [(r["step"], r["probe/step"]) for r in rows] == [(0, 0.0), (3, 3.0), (6, 6.0), (7, 7.0)]
  assert not any("eval/mi_infonce" in r for r in read_metrics(tmp_path / "metrics.jsonl"))  # mi_every_steps=0: off


# One method per structure (EMA target + predictor, shared weights + predictor, EMA
# target without predictor, joint); emmi runs in every other test.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["byol", "simsiam", "moco", "barlow_twins"])
def test_methods_train_a_step(tmp_path, name):
  # (The MI tracker off: the structure is under test here, the tracker in other tests.)
  overrides = {"train.num_steps": 2, "checkpoint.async_save": False, "eval.mi_every_steps": 0}
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


@pytest.mark.slow
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
  assert json.loads((tmp_path / "run" / "classes.json").read_text())["train"][:2] == ["airplane", "automobile"]


@pytest.mark.slow
def test_ctrl_c_saves_within_two_steps_of_where_it_stopped_and_the_same_command_resumes(tmp_path):
  """Ctrl-C (SIGINT; a preemption's SIGTERM takes the same path) saves a checkpoint at the
  step the run had reached, within a step or two, however far away the next progress
  line is (the loop once dispatched up to it, and a stop waited for all of it: 9 minutes
  on a CPU run of configs/cifar10.py), and exits with 128 + SIGINT; the run resumes from
  that step. While it runs, a second job on its work directory is refused, naming it."""
  n = 100_000  # neither a progress line nor a save interval ends before the signal
  overrides = [f"--config.train.num_steps={n}", f"--config.train.log_every={n}", f"--config.checkpoint.every_steps={n}",
               "--config.eval.mi_every_steps=0", "--config.eval.every_steps=0", "--config.model.width=64"]
  # One CPU device, as a plain CPU run has (the suite's 8 would bound the steps in flight
  # for a reason of their own, DispatchWindow.CPU_LIMIT).
  xla_flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
  with open(tmp_path / "log.txt", "w") as log:
    proc = subprocess.Popen(
        [sys.executable, "-m", "emim.main", f"--config={REPO}/configs/synthetic.py:runlocal", *overrides,
         f"--workdir={tmp_path / 'run'}"], stderr=log, stdout=log, cwd=REPO, env={**os.environ, "XLA_FLAGS": xla_flags})
  try:
    while not (tmp_path / "run" / "config.json").exists():  # written as the loop starts
      assert proc.poll() is None, (tmp_path / "log.txt").read_text()
      time.sleep(0.02)
    t_start = time.time()
    config = tiny_synthetic(**{"train.num_steps": n, "checkpoint.every_steps": n, "eval.mi_every_steps": 0,
                               "model.width": 64})
    with pytest.raises(WorkdirBusy, match=rf"in use by another job: pid {proc.pid} on "):
      train.run(config, str(tmp_path / "run"))
    time.sleep(max(0.0, t_start + 4.0 - time.time()))
    t_signal = time.time()
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
  finally:
    proc.kill()
  t_exit = time.time()
  log = (tmp_path / "log.txt").read_text()
  assert proc.returncode == 128 + signal.SIGINT, log
  assert "Received SIGINT: saving a checkpoint after the current step" in log and "Run the same command" in log
  stopped = Checkpointer(tmp_path / "run" / "checkpoints").latest_step()
  timings = json.loads((tmp_path / "run" / "timings.json").read_text())
  step_s = (timings["train_s"] - timings["checkpoint_s"]) / stopped  # training time a step, saves excluded
  # The steps trained after the signal: the share of the training time spent after it.
  after = stopped - (t_signal - t_start) / step_s
  assert 3 <= stopped < n and after <= 4, (stopped, after, step_s)
  # Promptly: the checkpoint is complete within a few steps' time of the signal, the save
  # apart (and a second for the signal to reach the loop and the save to be committed).
  saved_after = (tmp_path / "run" / "checkpoints" / str(stopped) / "commit_success.txt").stat().st_mtime - t_signal
  assert saved_after - timings["checkpoint_s"] <= 6 * step_s + 1.0, (saved_after, step_s, timings)
  assert t_exit - t_signal < 60  # and the process ends (proc.wait's limit is 120 s)
  resumed = train.run(config, str(tmp_path / "run"), stop_at_step=stopped + 1)
  assert int(resumed.state.step) == stopped + 1


@pytest.mark.slow
def test_corrupt_checkpoint_is_reported_left_in_place_and_the_advice_works(tmp_path):
  import shutil

  config = tiny_synthetic()
  train.run(config, str(tmp_path), stop_at_step=2)
  train.run(config, str(tmp_path), stop_at_step=3)
  state = tmp_path / "checkpoints" / "3" / "state"
  pristine = tmp_path.parent / f"{tmp_path.name}_state3"
  shutil.copytree(state, pristine)

  def damaged(how):
    shutil.rmtree(state)
    shutil.copytree(pristine, state)
    if how == "torn metadata":
      (state / "_METADATA").write_bytes(b"\x00garbage")  # a torn write
    elif how == "truncated array files":  # ocdbt.process_0/d/, and d/ where the files were merged
      for f in state.rglob("d/*"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "no manifest":
      (state / "manifest.ocdbt").unlink()
    elif how == "no process folder":
      shutil.rmtree(state / "ocdbt.process_0")

  for how in ("torn metadata", "no process folder"):
    damaged(how)
    with pytest.raises(CheckpointError, match=r"left as it is\. To continue from step 2, fork it: .*restore_step=2; "
                                              r"or move .*3 aside"):
      train.run(config, str(tmp_path))
  # The command line says it in one line: no traceback, no warning of Orbax's about the
  # options emim chose, nothing after it (TensorStore's callbacks onto Orbax's closed
  # event loop printed some 130 tracebacks of "Event loop is closed" for a missing
  # manifest, and "Exception ignored in: <coroutine ...>" ones for truncated files). In
  # a fresh process: this one's TensorStore may still hold the files it wrote.
  for how in ("truncated array files", "no manifest"):
    damaged(how)
    command = subprocess.run([sys.executable, "-m", "emim.main", f"--config={REPO}/configs/synthetic.py:runlocal",
                              f"--workdir={tmp_path}"], capture_output=True, text=True, cwd=REPO)
    said = [line for line in command.stderr.splitlines() if line.strip() and not line.startswith("I")]
    assert command.returncode == 1 and len(said) == 1 and said[0].startswith("error: Cannot restore the checkpoint"), \
        (how, said[:20])
  assert (tmp_path / "checkpoints" / "3").is_dir()  # nothing already saved was deleted
  os.rename(tmp_path / "checkpoints" / "3", tmp_path / "checkpoints" / "3.corrupt")  # the advice, followed
  assert int(train.run(config, str(tmp_path)).state.step) == 4
