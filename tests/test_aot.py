"""emim's programs compiled ahead of time on this CPU (python -m emim.aot): for Cloud TPU
slices (libtpu, from the tpu extra), what a TPU run depends on,
asserted on the compiled programs of the runlocal ImageNet step (streamed crops) and the
synthetic step (batch gathered on the device), for a single-host slice (v5e:2x2, 4 chips)
and a multi-host one (v5e:4x4, 16 chips on 4 hosts). Also launch/tpu_vm.sh --dry_run and
the CPU choice of a machine without an accelerator. The targets, their specs and the
report of a compile without a cost analysis (XLA's GPU compiler gives none) are tested
without any plugin; one real GPU compile runs where jax's CUDA plugin is installed
(pip install -e ".[cuda-aot]"; docs/aot.md), and skips elsewhere.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from conftest import REPO, load_config

from emim import sharding, train
from emim.aot import cli, report, search, supervisor, targets
from emim.aot import programs as programs_lib

# The suite's persistent compilation cache (conftest.py) stores the TPU executables too,
# but reading one back needs a TPU client: JAX warns and compiles again.
pytestmark = pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry")

TOPOLOGIES = ("v5e:2x2", "v5e:4x4")  # one host of 4 chips; 4 hosts of 4
CONFIGS = (("imagenet1k", "runlocal"), ("synthetic", "runlocal"))


@pytest.fixture(scope="module")
def tpu_compile():
  pytest.importorskip("libtpu", reason="libtpu is not installed: pip install -e .[tpu] (CI's .ci/run does)")
  return types.SimpleNamespace(**{k: getattr(m, k) for m in (report, search, targets) for k in dir(m)
                                  if not k.startswith("__")})


@pytest.fixture(scope="module")
def compiled(tpu_compile):
  """{(config, topology): (config, slice, the train step's report)}, each compiled once."""
  out = {}
  for name, variant in CONFIGS:
    for topology in TOPOLOGIES:
      config = load_config(name, variant)
      tpu = tpu_compile.target_devices(topology)
      out[name, topology] = (config, tpu, tpu_compile.compile_config(config, tpu, ("train",))[0])
  return out


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("name", [c[0] for c in CONFIGS])
def test_the_train_step_compiles_for_a_tpu_slice_as_a_run_needs(tpu_compile, compiled, name, topology):
  config, tpu, report = compiled[name, topology]
  n, batch, size = len(tpu.devices), config.train.batch_size, config.data.image_size
  assert n == {"v5e:2x2": 4, "v5e:4x4": 16}[topology] and tpu.hosts == n // 4
  assert not report.error, report.error
  # It fits, with the chip's HBM to spare.
  assert 0 < report.total < tpu.chip.hbm_gib * 2**30
  # Each chip takes its share of the batch: the streamed crops arrive as B/n rows; the
  # device-resident set is gathered and the views made at B/n rows, never the whole batch.
  hlo = report.hlo
  params = tpu_compile.entry_parameters(hlo)
  if config.data.stream:
    assert f"u8[{batch // n},2,{size},{size},3]" in params
    assert not any(p.startswith(f"u8[{batch},") for p in params)
  else:
    assert f"u8[{config.data.num_train},{size * size * 3}]" in params  # the training set, replicated, as rows
    assert f"f32[{batch // n},{size},{size},3]" in hlo
    assert f"f32[{batch},{size},{size},3]" not in hlo
  # The gradients are summed over the data axis: all-reduces across every chip carry at
  # least the trainable parameters' bytes (float32).
  state, _ = train.state_shapes(train.build_parts(config, config.data.num_classes, 10, 100),
                                sharding.make_mesh(tpu.devices))
  grad_bytes = sum(4 * int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  reduce = report.collectives["all-reduce"]
  assert reduce.widest_group == n
  assert reduce.bytes >= grad_bytes
  # The objective's matrix products (covariances, the Taylor powers, the power iteration)
  # run at HIGHEST precision (emim/objectives/precision.py); the network's at the default.
  objective = tpu_compile.products_by_precision(hlo, "emim/objectives/")
  assert objective["highest"] > 0 and objective["default"] == 0, objective
  assert tpu_compile.products_by_precision(hlo, "emim/models/")["default"] > 0


def test_a_program_the_chip_cannot_hold_is_one_line_not_a_traceback(tpu_compile):
  tpu = tpu_compile.target_devices("v5e:2x2")
  mesh = sharding.make_mesh(tpu.devices)
  x = jax.ShapeDtypeStruct((64 * 1024, 16 * 1024), np.float32, sharding=sharding.replicated(mesh))
  report = tpu_compile.analyse("big", jax.jit(lambda x: jax.numpy.sin(x) @ x.T).lower(x), 8, 4)  # 20 GiB > 16
  assert report.error.startswith("RESOURCE_EXHAUSTED") and "exceeds available HBM" in report.error
  assert "\n" not in report.error and "failed: RESOURCE_EXHAUSTED" in tpu_compile.table_row(report, tpu)
  # What --max_batch reads off the refusal: the memory asked for, the HBM available.
  assert tpu_compile.out_of_hbm(report.error) == (20 * 2**30, int(15.75 * 2**30))
  fit = tpu_compile.train_memory(None, tpu, 8, report)
  assert fit == tpu_compile.Fit(None, 20 * 2**30, int(15.75 * 2**30), report.error, out_of_memory=True)
  assert tpu_compile.out_of_hbm("INTERNAL: something else") is None
  # libtpu's other wording of it.
  other = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 17.50G of "
           "15.75G hbm. Exceeded hbm capacity by 1.75G.")
  assert tpu_compile.out_of_hbm(other) == (int(17.5 * 2**30), int(15.75 * 2**30))


GiB, MiB = 2**30, 2**20
SLICE_OF_16_GIB = type("Slice", (), {"chip": type("Chip", (), {"hbm_gib": 16})})  # all max_batch reads of a slice
MEMORY_MODELS = {  # bytes per chip of a train step at global batch b, against a 16 GiB chip
    "linear": lambda b: 2 * GiB + b * 10 * MiB,
    "linear, steep": lambda b: 12 * GiB + b * 40 * MiB,
    "linear, and the compiler refuses twice the config's batch": lambda b: 0.6 * GiB + b * 35 * MiB,
    "a jump where the compiler changes its plan": lambda b: GiB + b * 5 * MiB + (4 * GiB if b > 1500 else 0),
    "convex": lambda b: GiB + b * MiB + (b / 64) ** 2 * 20 * MiB,
    "flat: the whole training set fits": lambda b: GiB + b,
    "the config's batch does not fit": lambda b: 15 * GiB + b * 50 * MiB,
}


@pytest.mark.parametrize("model", MEMORY_MODELS)
def test_max_batch_finds_the_largest_multiple_that_fits_in_few_compiles(tpu_compile, monkeypatch, model):
  """The search reads its next try off the memory of the compiles so far; each try is a
  compile (minutes for ResNet-50), so it must land on the answer in few of them, and the
  answer must be the one a try of every multiple would give."""
  memory = MEMORY_MODELS[model]
  tried = []

  def train_memory(config, tpu, batch, on_cublas=False):
    tried.append(batch)
    used = int(memory(batch))
    if used > 15.75 * GiB:  # over what the compiler has: it refuses, saying what it asked for (as XLA's TPU does)
      return tpu_compile.Fit(None, used, int(15.75 * GiB), "RESOURCE_EXHAUSTED", out_of_memory=True)
    return tpu_compile.Fit(used, None, None, "")

  monkeypatch.setattr(search, "train_memory", train_memory)
  config = _large_set(load_config("synthetic", "runlocal"))
  best = search.max_batch(config, SLICE_OF_16_GIB, 64)
  cap = config.data.num_train // 64 * 64  # no batch beyond the training set
  brute = max([b for b in range(64, cap + 1, 64) if memory(b) <= 15.75 * GiB] or [0])
  assert best == brute, (best, brute, tried)
  assert all(b % 64 == 0 for b in tried) and len(set(tried)) == len(tried), tried
  bisection = 2 + int(np.ceil(np.log2(max(brute, 64) / 64)))
  assert len(tried) <= (4 if model.startswith("linear") else bisection + 3), tried


def test_max_batch_stops_on_a_compile_error_that_is_not_memory(tpu_compile, monkeypatch):
  """A step that does not compile at all would fail at every batch: the search says so
  instead of bisecting down to 0. An out-of-memory refusal without figures narrows it."""
  tried = []
  monkeypatch.setattr(search, "train_memory", lambda config, tpu, batch, on_cublas=False: tried.append(batch) or (
      tpu_compile.Fit(GiB + batch * 10 * MiB, None, None) if batch <= 640 else
      tpu_compile.Fit(None, None, None, "RESOURCE_EXHAUSTED: out of memory", out_of_memory=True)))
  assert search.max_batch(_large_set(load_config("synthetic", "runlocal")), SLICE_OF_16_GIB, 64) == 640, tried
  tried.clear()
  monkeypatch.setattr(search, "train_memory", lambda config, tpu, batch, on_cublas=False: tried.append(batch) or search.Fit(
      None, None, None, "INTERNAL: RET_CHECK failure"))
  with pytest.raises(search.SearchError, match="at batch 256 failed to compile, not for want of HBM: INTERNAL: RET_CHECK"):
    search.max_batch(_large_set(load_config("synthetic", "runlocal")), SLICE_OF_16_GIB, 64)
  assert tried == [256]


def _large_set(config):
  """The config at batch 256 on a training set of 50,000 (the search goes no further)."""
  with config.unlocked():
    config.train.batch_size, config.data.num_train = 256, 50_000
  return config


# A stand-in for the compiling child: it notes each program as tpu_compile's child does,
# and dies of a signal where FAKE_PLAN says (the programs to crash on, the signal, a crash
# at its exit instead); given --max_batch it "compiles" the train step at a batch too.
FAKE_COMPILER = """
import json, os, signal, sys, time
plan = json.loads(os.environ["FAKE_PLAN"])
programs = [a for a in sys.argv[1:] if not a.startswith("--")]
def note(program, **extra):
  with open(os.environ["EMIM_TPU_COMPILE_STATUS"], "w") as f:
    json.dump({"program": program, "images": 256, "devices": 8, "compiler": "libtpu 0.0.42.1", "since": time.time(),
               **extra}, f)
if "--no_header" not in sys.argv and programs:
  print("| program | images/call (per chip) |")
for program in programs:
  note(program)
  if program in plan["crash"]:
    os.kill(os.getpid(), getattr(signal, plan["signal"]))
  print(f"| {program} | 256 (32) | compiled |", flush=True)
  note(None)
if "--max_batch" in sys.argv:
  note("train", max_batch=True)
  if "max_batch" in plan["crash"]:
    os.kill(os.getpid(), getattr(signal, plan["signal"]))
  print("max_batch 512 (64 per chip) on v6e-8", flush=True)
  note(None)
if plan.get("at_exit"):
  os.kill(os.getpid(), getattr(signal, plan["signal"]))
"""


@pytest.fixture
def fake_compile(tmp_path, monkeypatch, capsys):
  """run(argv, crash=..., signal=..., at_exit=...) -> (exit status, printed lines, the
  children's (programs, first, max_batch)): tpu_compile's supervisor over FAKE_COMPILER."""
  script = tmp_path / "fake_compiler.py"
  script.write_text(FAKE_COMPILER)

  def run(argv, crash=(), signal="SIGSEGV", at_exit=False):
    monkeypatch.setenv("FAKE_PLAN", json.dumps({"crash": list(crash), "signal": signal, "at_exit": at_exit}))
    calls = []

    def child_argv(args, programs, first, max_batch):
      calls.append((list(programs), first, max_batch))
      return [sys.executable, str(script), *programs] + ([] if first else ["--no_header"]) + (
          ["--max_batch"] if max_batch else [])

    args = cli.parse_args([f"--config={REPO / 'configs' / 'cifar10.py'}", "--target=v6e:2x4", *argv])
    status = supervisor.supervise(args, child_argv)
    return status, capsys.readouterr().out.splitlines(), calls

  return run


def test_a_compiler_crash_is_a_row_and_the_programs_after_it_still_compile(fake_compile):
  """The compiles run in a child process; a child killed by a signal (libtpu's compiler
  crashing, which no try/except can catch) becomes the row of the program it was
  compiling, and the rest are compiled in a fresh child."""
  status, rows, calls = fake_compile(["--programs=train,mi,probe,features"], crash=("train", "probe"))
  assert status == 1
  assert calls == [(["train", "mi", "probe", "features"], True, False), (["mi", "probe", "features"], False, False),
                   (["features"], False, False)]
  assert rows[0].startswith("| program |") and len(rows) == 5, rows
  for row, program in zip(rows[1:], ("train", "mi", "probe", "features")):
    assert row.startswith(f"| {program} | 256 (32) | "), row
  for crashed in (rows[1], rows[3]):
    assert "failed: libtpu 0.0.42.1 crashed compiling it (SIGSEGV, " in crashed and "TPU_LIBRARY_PATH" in crashed
  assert rows[2] == "| mi | 256 (32) | compiled |" and rows[4] == "| features | 256 (32) | compiled |"
  # A child that ends on its own passes its exit status on.
  assert fake_compile(["--programs=mi"])[0] == 0


def test_a_crash_of_the_train_step_skips_max_batch_and_others_still_search(fake_compile):
  # The train step crashed: --max_batch would compile it again, so it is not searched.
  status, rows, calls = fake_compile(["--programs=train,mi", "--max_batch"], crash=("train",))
  assert status == 1 and calls == [(["train", "mi"], True, True), (["mi"], False, False)]
  assert "--max_batch: not searched, the train step's compile died." in rows
  assert not any(r.startswith("max_batch") for r in rows)
  # The last program crashed, not the train step: the search still runs, in a fresh child.
  status, rows, calls = fake_compile(["--programs=train,probe", "--max_batch"], crash=("probe",))
  assert status == 1 and calls == [(["train", "probe"], True, True), ([], False, True)]
  assert rows[-1] == "max_batch 512 (64 per chip) on v6e-8"
  # A crash inside the search is its line, and ends it: the table's programs are not compiled again.
  status, rows, calls = fake_compile(["--programs=train,mi", "--max_batch"], crash=("max_batch",))
  assert status == 1 and len(calls) == 1 and rows[-1].startswith("  batch 256: failed: libtpu 0.0.42.1 crashed")
  assert rows.count("| mi | 256 (32) | compiled |") == 1


def test_crashes_outside_a_compile_and_the_oom_killer_are_told_apart(fake_compile):
  # After the last compile: the rows stand, nothing is compiled again.
  status, rows, calls = fake_compile(["--programs=mi,features"], at_exit=True)
  assert status == 1 and len(calls) == 1
  assert rows[1:] == ["| mi | 256 (32) | compiled |", "| features | 256 (32) | compiled |",
                      "libtpu 0.0.42.1 crashed (SIGSEGV) after the last compile; the rows above stand."]
  # SIGKILL is this machine's out-of-memory killer, not libtpu: said so, and the rest go on.
  status, rows, calls = fake_compile(["--programs=train,mi"], crash=("train",), signal="SIGKILL")
  assert status == 1 and len(calls) == 2
  assert rows[1].startswith("| train | 256 (32) | failed: killed (SIGKILL: most often this machine's out-of-memory")
  assert "libtpu" not in rows[1] and rows[2] == "| mi | 256 (32) | compiled |"
  # A signal from outside (SIGTERM to the child alone) is not blamed on libtpu either.
  status, rows, calls = fake_compile(["--programs=train"], crash=("train",), signal="SIGTERM")
  assert status == 1 and rows[1].startswith("| train | 256 (32) | failed: stopped by SIGTERM, sent from outside")


def test_the_libtpu_in_use_is_named_and_a_known_crash_comes_with_its_fix(tmp_path):
  from emim import tpu

  # A libtpu given by TPU_LIBRARY_PATH, laid out as its wheel unpacks: the version is read
  # beside it (in a process that has loaded no libtpu).
  library = tmp_path / "site" / "libtpu" / "libtpu.so"
  library.parent.mkdir(parents=True)
  library.write_bytes(b"")
  info = tmp_path / "site" / "libtpu-0.0.52.dist-info"
  info.mkdir()
  (info / "METADATA").write_text("Metadata-Version: 2.4\nName: libtpu\nVersion: 0.0.52\n")
  code = "from emim.tpu import libtpu_in_use; print(*libtpu_in_use())"
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TPU_LIBRARY_PATH": str(library), "PYTHONPATH": str(REPO)})
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["0.0.52", str(library)]
  # jax 0.10.2's pinned libtpu crashes compiling the ResNet steps for a v6e, not for a v5e.
  advice = tpu.libtpu_advice("TPU v6 lite", "0.0.42.1")
  assert "pip install libtpu==0.0.52" in advice and "0.0.42.1" in advice
  assert tpu.libtpu_advice("TPU v5 lite", "0.0.42.1") is None
  assert tpu.libtpu_advice("TPU v6 lite", "0.0.52") is None


def test_a_batch_that_does_not_split_over_the_chips_is_one_line(tpu_compile):
  result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "tpu_compile.py"),
                           "--config=configs/synthetic.py:runlocal", "--topology=v5e:2x4", "--batch=36"],
                          capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
  assert result.returncode != 0
  assert "The global batch 36 does not split over the 8 chips of v5litepod-8: --batch 32 would." in result.stderr


def test_one_bf16_pass_rounds_default_products_and_leaves_the_statistics_float32():
  """benchmarks/matmul_precision.py's replay of a TPU's default float32 product on the
  CPU, and the objective's products marked HIGHEST, which it (like a TPU) leaves exact."""
  from emim import objectives as O

  spec = importlib.util.spec_from_file_location("emim_matmul_precision", REPO / "benchmarks" / "matmul_precision.py")
  replay = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(replay)
  z = np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32)
  centred = z - z.mean(0)
  plain = lambda a: a.T @ a / a.shape[0]
  bf16 = lambda a: a.astype(jax.numpy.bfloat16).astype(np.float64)
  with replay.one_bf16_pass():
    jax.clear_caches()
    rounded, statistic = np.asarray(jax.jit(plain)(centred)), np.asarray(jax.jit(O.covariance)(z))
  jax.clear_caches()
  exact = centred.astype(np.float64).T @ centred.astype(np.float64) / 64
  np.testing.assert_allclose(rounded, bf16(centred).T @ bf16(centred) / 64, rtol=1e-5, atol=1e-6)
  assert np.abs(rounded - exact).max() > 1e-3  # the pass moved it
  np.testing.assert_allclose(statistic, exact, rtol=1e-5, atol=1e-6)  # HIGHEST: untouched


def test_the_launch_script_dry_run_prints_the_gcloud_commands(tmp_path):
  # A gcloud that records being called: a dry run must not call it.
  fake = tmp_path / "bin"
  fake.mkdir()
  (fake / "gcloud").write_text(f"#!/bin/sh\ntouch {tmp_path}/called\n")
  (fake / "gcloud").chmod(0o755)
  env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
  script = str(REPO / "launch" / "tpu_vm.sh")
  result = subprocess.run(["bash", script, "--dry_run", "my-v5e", "us-west4-a", "configs/imagenet1k.py",
                           "gs://bkt/runs/in1k", "--config.train.batch_size=512"], capture_output=True, text=True, env=env)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert len(lines) == 3 and lines[0].startswith("tar -C ")
  assert lines[1] == ("gcloud compute tpus tpu-vm scp /tmp/emim-bundle/emim.tar.gz my-v5e:emim.tar.gz "
                      "--zone=us-west4-a --worker=all")
  assert lines[2].startswith("gcloud compute tpus tpu-vm ssh my-v5e --zone=us-west4-a --worker=all '--command=")
  assert ("python -m emim.main --distributed --config=configs/imagenet1k.py --workdir=gs://bkt/runs/in1k "
          "--config.train.batch_size=512'") in lines[2]
  assert not (tmp_path / "called").exists()
  # No overrides: no empty argument for emim.main to reject; --libtpu installs that libtpu
  # after the extras (a v6e's fix, emim/tpu.py).
  bare = subprocess.run(["bash", script, "--dry_run", "--libtpu=0.0.52", "my-v6e", "us-east5-b", "configs/cifar10.py",
                         "gs://bkt/runs/c10"], capture_output=True, text=True, env=env)
  assert bare.returncode == 0, bare.stderr
  assert bare.stdout.splitlines()[2].endswith(
      "pip install -q '\\''.[gcs,tpu]'\\'' && pip install -q libtpu==0.0.52 && python -m emim.main --distributed "
      "--config=configs/cifar10.py --workdir=gs://bkt/runs/c10'"), bare.stdout
  spaced = subprocess.run(["bash", script, "--dry_run", "--libtpu", "0.0.52", "my-v6e", "us-east5-b",
                           "configs/cifar10.py", "gs://bkt/runs/c10"], capture_output=True, text=True, env=env)
  assert spaced.returncode == 0 and spaced.stdout == bare.stdout, spaced.stderr
  wrong = subprocess.run(["bash", script, "--libtpu=latest", "t", "z", "configs/cifar10.py", "gs://b/r"],
                         capture_output=True, text=True, env=env)
  assert wrong.returncode == 2 and "--libtpu wants a version" in wrong.stderr
  late = subprocess.run(["bash", script, "t", "z", "configs/cifar10.py", "gs://b/r", "--libtpu=0.0.52"],
                        capture_output=True, text=True, env=env)
  assert late.returncode == 2 and "--libtpu=0.0.52 is launch/tpu_vm.sh's option: put it before TPU_NAME" in late.stderr
  # Without --dry_run gcloud is called; a local work directory or a missing config is refused.
  local = subprocess.run(["bash", script, "t", "z", "configs/imagenet1k.py", "/tmp/run"], capture_output=True,
                         text=True, env=env)
  assert local.returncode == 2 and "must be a gs:// path" in local.stderr
  missing = subprocess.run(["bash", script, "t", "z", "configs/nope.py", "gs://b/r"], capture_output=True, text=True,
                           env=env)
  assert missing.returncode == 2 and "No config configs/nope.py" in missing.stderr
  assert not (tmp_path / "called").exists()


def test_without_an_accelerator_jax_runs_on_the_cpu_without_probing_for_a_tpu():
  pytest.importorskip("libtpu", reason="without libtpu JAX does not probe for a TPU")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  code = "from emim import cli; cli.cpu_without_accelerator(); import jax; print(jax.default_backend())"
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, "PYTHONPATH": str(REPO)},
                          timeout=120)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "cpu"
  assert "TPU" not in result.stderr and "libtpu" not in result.stderr, result.stderr


# ----------------------------------------------------------------------------------
# Targets, specs and reports, without any compiler plugin.
# ----------------------------------------------------------------------------------
def test_targets_are_read_as_written_and_a_wrong_one_is_one_line_naming_the_forms():
  assert targets.parse_target("v5e:2x4") == targets.TargetSpec("v5e:2x4", "v5e", (2, 4))
  assert targets.parse_target("v4:2x2x1").devices == 4
  assert targets.parse_target("h100:8") == targets.TargetSpec("h100:8", "h100", (1, 8))  # one host of 8
  h100s = targets.parse_target("H100:2x8")
  assert h100s.dims == (2, 8) and h100s.devices == 16 and h100s.platform == "cuda"
  assert targets.parse_target("a100-40g:8").chip is targets.GPUS["a100-40g"]
  assert targets.parse_target("a100-40g:16").devices == 16  # Google Cloud's a2-megagpu-16g
  for wrong, says in (("h100", "give a TPU generation or a GPU (v4, v5e, v5p, v6e, a100-40g, a100-80g, h100, h200)"),
                      ("b200:8", "e.g. v5e:2x4"), ("h100:2x2x8", "hosts x GPUs per host (h100:2x8)"),
                      ("v5e:0x4", "positive numbers"), ("v5e:2x4x1x1", "at most 3 dimensions"), ("v5e:2by4", "joined by x"),
                      ("h100:1000", "1000 GPUs on one host; a cloud host holds at most 8 of these (give more hosts: "
                                    "h100:125x8)"), ("h100:16", "at most 8 of these (give more hosts: h100:2x8)"),
                      ("a100-40g:2x17", "17 GPUs on one host; a cloud host holds at most 16 of these (give more hosts: "
                                        "a100-40g:5x8)")):
    with pytest.raises(targets.TargetError, match=re.escape(says)):
      targets.parse_target(wrong)


def test_a_gpu_target_without_the_cuda_plugin_says_how_to_install_it(monkeypatch, capsys):
  monkeypatch.setattr(cli, "cuda_plugin_installed", lambda: False)
  with pytest.raises(SystemExit) as exit:
    cli.main([f"--config={REPO / 'configs' / 'synthetic.py'}:runlocal", "--target=h100:8"])
  assert exit.value.code == 1
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and err.startswith("error: --target=h100:8: ") and 'pip install -e ".[cuda-aot]"' in err
  cli.check_target("v5e:2x4")  # a TPU target needs no CUDA plugin


def test_the_gpu_specs_are_the_published_ones_and_describe_the_gpu_to_xla():
  # NVIDIA's datasheets: dense bf16 (half the "with sparsity" figure for H100/H200), bandwidth.
  published = {"a100-40g": (312, 1555), "a100-80g": (312, 2039), "h100": (1979 / 2, 3352), "h200": (1979 / 2, 4800)}
  for model, (tflops, gbps) in published.items():
    chip = targets.GPUS[model]
    assert (chip.bf16_tflops, chip.hbm_gbps, chip.platform) == (pytest.approx(tflops, rel=1e-3), gbps, "cuda")
    text = targets.gpu_target_config(model)
    assert text.count("{") == text.count("}")
    fields = dict(re.findall(r"^\s*(\w+): (\S+)$", text, re.M))
    assert int(fields["device_memory_size"]) == round(chip.hbm_gib * 2**30)
    assert int(fields["memory_bandwidth"]) == gbps * 10**9
  # Memory as CUDA reports it (XLA's own specs): an "80 GB" H100 has 79.1 GiB, a 40 GB A100 39.4.
  assert round(targets.GPUS["h100"].hbm_gib, 1) == 79.1 and round(targets.GPUS["a100-40g"].hbm_gib, 1) == 39.4
  assert "core_count: 132" in targets.gpu_target_config("h100") and "major: 9" in targets.gpu_target_config("h100")
  assert "core_count: 108" in targets.gpu_target_config("a100-80g") and "major: 8" in targets.gpu_target_config("a100-80g")


class _Compiled:
  """What a compile for a GPU gives back: memory, the HLO, and no cost analysis."""

  def __init__(self, hlo):
    self.hlo = hlo

  def compile(self):
    return self

  def memory_analysis(self):
    return types.SimpleNamespace(argument_size_in_bytes=3 * 2**30, temp_size_in_bytes=2**30,
                                 output_size_in_bytes=2 * 2**30, alias_size_in_bytes=2 * 2**30)

  def cost_analysis(self):
    return None

  def as_text(self):
    return self.hlo


GPU_HLO = """HloModule jit_step, entry_computation_layout={(f32[1024]{0})->f32[1024]{0}}
ENTRY %main {
  %all-reduce-start = f32[1024,1024]{1,0} all-reduce-start(f32[1024,1024]{1,0} %p), replica_groups={{0,1,2,3,4,5,6,7}}
}
"""


def test_a_compile_without_a_cost_analysis_is_reported_with_the_lowered_flops():
  h100 = targets.Target(targets.parse_target("h100:8"), tuple(range(8)), 1)
  r = report.analyse("train", _Compiled(GPU_HLO), 256, 8, global_flops=8 * 989.5e9)
  assert not r.error and r.cost_source == "lowered"
  assert r.flops == 989.5e9 and r.bytes_accessed == 0 and r.total == 4 * 2**30
  assert r.collectives["all-reduce"].count == 1 and r.collectives["all-reduce"].bytes == 4 * 2**20
  compute, memory, binds, rate = report.roofline(r, h100.chip, 8)
  assert compute == pytest.approx(1e-3) and memory is None and binds == "compute" and rate == pytest.approx(32_000)
  row = report.table_row(r, h100)
  assert row.startswith("| train | 256 (32) | 3.00 | 1.00 | 2.00 | 4.00 (5% of 79.1) | 989.5 (lowered, /8) | unknown | "
                        "1.0 / unknown (compute only) | 32000 | all-reduce 1x 4.0 MiB |"), row
  # No FLOPs from anywhere: the memory still, the rest said to be missing.
  bare = report.analyse("mi", _Compiled(GPU_HLO), 64, 8)
  assert bare.cost_source == "" and "| 4.00 (5% of 79.1) | no cost analysis |" in report.table_row(bare, h100)


class _NoTritonTiling(_Compiled):
  """XLA's GPU compiler without a GPU, on a program with a Triton GEMM fusion its default
  tiling does not fit: the compile fails unless the products go to cuBLAS."""

  def __init__(self, hlo, error=f"INTERNAL: {report.NO_TRITON_TILING} that satisfy hlo: %dot.382 = bf16[25216,384]"):
    super().__init__(hlo)
    self.error, self.options = error, []

  def compile(self, compiler_options=None):
    self.options.append(compiler_options)
    if compiler_options != {"xla_gpu_enable_triton_gemm": False}:
      raise RuntimeError(self.error)
    return self


def test_a_product_with_no_triton_tiling_is_compiled_again_on_cublas_and_said_so(capsys):
  h100 = targets.Target(targets.parse_target("h100:8"), tuple(range(8)), 1)
  lowered = _NoTritonTiling(GPU_HLO)
  r = report.analyse("train", lowered, 1024, 8, global_flops=8e12)
  assert lowered.options == [None, {"xla_gpu_enable_triton_gemm": False}]
  assert not r.error and r.total == 4 * 2**30 and "--xla_gpu_enable_triton_gemm=false" in r.compiled_with
  assert report.table_row(r, h100).startswith("| train (*) | 1024 (128) | 3.00 |")
  assert report.footnotes([r]) == [f"(*) train: {r.compiled_with}."] and "bf16[25216,384]" in r.compiled_with
  assert "..." not in r.compiled_with  # XLA's line whole; a long one is cut, and said to be
  long = report.analyse("train", _NoTritonTiling(GPU_HLO, error=f"INTERNAL: {report.NO_TRITON_TILING} " + "x" * 300),
                        1024, 8)
  assert f"{report.NO_TRITON_TILING} {'x' * (160 - len(report.NO_TRITON_TILING) - 11)}...)" in long.compiled_with
  # Any other error is the row's error, compiled once; and so is this one where cuBLAS fails too.
  other = _NoTritonTiling(GPU_HLO, error="RESOURCE_EXHAUSTED: out of memory")
  r = report.analyse("train", other, 1024, 8)
  assert r.error == "RESOURCE_EXHAUSTED: out of memory" and other.options == [None] and not r.compiled_with
  assert report.footnotes([r]) == []
  # A --max_batch try that needed it says so on its own line (the table's footnote may not be there).
  fit = search.train_memory(load_config("synthetic", "runlocal"), h100, 1024, report.analyse(
      "train", _NoTritonTiling(GPU_HLO), 1024, 8, global_flops=8e12))
  out = capsys.readouterr().out
  assert fit.used == 4 * 2**30 and "its products on cuBLAS: no Triton tiling found without a GPU)" in out, out
  both = _NoTritonTiling(GPU_HLO)
  both.compile = lambda compiler_options=None: (_ for _ in ()).throw(RuntimeError(
      f"INTERNAL: Couldn't find output tile sizes {compiler_options}"))
  assert report.analyse("train", both, 1024, 8).error == "INTERNAL: Couldn't find output tile sizes None"


class _StepOfBatch(_NoTritonTiling):
  """A ViT's train step without a GPU at global ``batch``: no Triton tiling (cuBLAS only);
  2 GiB + 10 MiB per image."""

  def memory_analysis(self):
    return types.SimpleNamespace(argument_size_in_bytes=2 * GiB + self.batch * 10 * MiB, temp_size_in_bytes=0,
                                 output_size_in_bytes=0, alias_size_in_bytes=0)


def _compiling(step_class, compiles):
  """A stand-in for report.compile_config: each call a ``step_class`` at the config's batch,
  analysed as the real one does; (batch, the options of each compile of it) into ``compiles``."""

  def compile_config(config, target, programs, note=None, on_cublas=False):
    step = step_class(GPU_HLO)
    step.batch = config.train.batch_size
    compiles.append((step.batch, step.options))
    return [report.analyse("train", step, step.batch, 8, global_flops=1e12, on_cublas=on_cublas)]

  return compile_config


def test_max_batch_compiles_on_cublas_at_once_after_a_try_needed_it(monkeypatch, capsys):
  """A ViT's step on a GPU compiles only with its products on cuBLAS (no Triton tiling
  without a GPU): each later try of --max_batch compiles that way at once, not failing first."""
  monkeypatch.delenv("XLA_CLIENT_MEM_FRACTION", raising=False)
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  monkeypatch.delenv("XLA_PYTHON_CLIENT_ALLOCATOR", raising=False)
  h100 = targets.Target(targets.parse_target("h100:8"), tuple(range(8)), 1)
  compiles = []  # (batch, the options of each compile of it)
  monkeypatch.setattr(search, "compile_config", _compiling(_StepOfBatch, compiles))
  best = search.max_batch(_large_set(load_config("synthetic", "runlocal")), h100, 64)
  pool = 0.75 * targets.GPUS["h100"].hbm_gib * GiB
  assert best == max(b for b in range(64, 50_000, 64) if 2 * GiB + b * 10 * MiB <= pool)
  cublas = {"xla_gpu_enable_triton_gemm": False}
  assert compiles[0] == (256, [None, cublas]) and len(compiles) > 2, compiles  # failed, then on cuBLAS
  assert all(options == [cublas] for _, options in compiles[1:]), compiles  # at once
  assert capsys.readouterr().out.count("its products on cuBLAS") == len(compiles)
  # A step compiled on cuBLAS at once that still fails reports its own error, compiled once.
  other = _NoTritonTiling(GPU_HLO, error="RESOURCE_EXHAUSTED: out of memory")
  other.compile = lambda compiler_options=None: other.options.append(compiler_options) or (_ for _ in ()).throw(
      RuntimeError("RESOURCE_EXHAUSTED: out of memory"))
  assert report.analyse("train", other, 1024, 8, on_cublas=True).error == "RESOURCE_EXHAUSTED: out of memory"
  assert other.options == [cublas]


def test_max_batch_reads_a_step_out_of_memory_on_cublas_as_out_of_memory(monkeypatch, capsys):
  """The first try fails Triton's tiling, and on cuBLAS runs out of memory: that is a batch
  too large (the search narrows), not a step that compiles at no batch; and the later tries
  compile on cuBLAS at once."""
  for name in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_ALLOCATOR"):
    monkeypatch.delenv(name, raising=False)
  h100 = targets.Target(targets.parse_target("h100:8"), tuple(range(8)), 1)
  cublas = {"xla_gpu_enable_triton_gemm": False}
  compiles = []  # (batch, the options of each compile of it)

  class Step(_StepOfBatch):
    def compile(self, compiler_options=None):
      self.options.append(compiler_options)
      if compiler_options != cublas:
        raise RuntimeError(self.error)
      if self.batch > 128:  # the compiler refuses it for want of memory, without figures
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 90.00GiB.")
      return self

  compile_config = _compiling(Step, compiles)
  monkeypatch.setattr(search, "compile_config", compile_config)
  assert search.max_batch(_large_set(load_config("synthetic", "runlocal")), h100, 64) == 128, compiles
  assert compiles[0] == (256, [None, cublas]), compiles  # Triton's failure, then cuBLAS's out of memory
  assert all(options == [cublas] for _, options in compiles[1:]) and len(compiles) > 1, compiles
  out = capsys.readouterr().out
  assert "batch 256: does not fit (RESOURCE_EXHAUSTED: Out of memory while trying to allocate 90.00GiB." in out, out
  # The table's step (at the config's batch, not a multiple: not a try) needed cuBLAS: so does the first try.
  config, compiles[:] = _large_set(load_config("synthetic", "runlocal")), []
  with config.unlocked():
    config.train.batch_size = 100
  table_step = report.analyse("train", Step(GPU_HLO), 100, 8, on_cublas=True)
  assert table_step.on_cublas and search.max_batch(config, h100, 64, table_step) == 128
  assert compiles and all(options == [cublas] for _, options in compiles), compiles


def test_a_gpu_program_fits_in_jaxs_memory_pool_not_the_whole_gpu(monkeypatch):
  """JAX on a GPU allocates from 75% of its memory unless the environment says otherwise:
  a step that fits the GPU but not the pool does not fit, and --max_batch stops at the pool."""
  for name in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_ALLOCATOR"):
    monkeypatch.delenv(name, raising=False)
  h100 = targets.Target(targets.parse_target("h100:8"), tuple(range(8)), 1)
  whole = targets.GPUS["h100"].hbm_gib * GiB
  assert targets.usable_bytes(h100) == int(0.75 * whole)
  assert targets.usable_bytes(targets.Target(targets.parse_target("v5e:2x4"), tuple(range(8)), 1)) == 16 * GiB
  memory = lambda b: 2 * GiB + b * 10 * MiB  # per GPU at global batch b

  def compile_config(config, target, programs, note=None, on_cublas=False):
    return [report.Report("train", config.train.batch_size, 1.0, arguments=int(memory(config.train.batch_size)))]

  monkeypatch.setattr(search, "compile_config", compile_config)
  config = _large_set(load_config("synthetic", "runlocal"))
  brute = lambda limit: max(b for b in range(64, 100_000, 64) if memory(b) <= limit)
  assert search.max_batch(config, h100, 64) == brute(0.75 * whole) == 5824
  r = compile_config(config, h100, ("train",))[0]
  r.arguments = int(0.8 * whole)  # fits the GPU, not the pool
  assert f"(80% of 79.1: over the {0.75 * whole / GiB:.3g} GiB pool, does not fit) |" in report.table_row(r, h100)
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", ".95")
  assert search.max_batch(config, h100, 64) == brute(0.95 * whole) and "pool" not in report.table_row(r, h100)
  monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", "1")  # both: jaxlib's GPU client raises a ValueError
  for allocator in ("", "platform"):
    monkeypatch.setenv("XLA_PYTHON_CLIENT_ALLOCATOR", allocator)
    with pytest.raises(targets.TargetError, match=r"are both set, which JAX refuses on a GPU: unset "
                                                  r"XLA_PYTHON_CLIENT_MEM_FRACTION"):
      targets.memory_pool(h100.chip)
  monkeypatch.delenv("XLA_PYTHON_CLIENT_ALLOCATOR")
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION")
  assert targets.memory_pool(h100.chip) == (1.0, "XLA_CLIENT_MEM_FRACTION=1")
  for bad in ("95", "0", "most"):
    monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", bad)
    with pytest.raises(targets.TargetError, match=r"XLA_CLIENT_MEM_FRACTION='.*': .* above 0 and at most 1"):
      targets.memory_pool(h100.chip)
  monkeypatch.delenv("XLA_CLIENT_MEM_FRACTION")
  monkeypatch.setenv("XLA_PYTHON_CLIENT_ALLOCATOR", "platform")
  assert targets.usable_bytes(h100) == int(whole)
  monkeypatch.setenv("XLA_PYTHON_CLIENT_ALLOCATOR", "cuda_async")  # another JAX takes: the pool's share
  assert targets.usable_bytes(h100) == int(0.75 * whole)
  monkeypatch.setenv("XLA_PYTHON_CLIENT_ALLOCATOR", "plattform")  # one JAX refuses as it starts: refused here
  with pytest.raises(targets.TargetError, match=r"XLA_PYTHON_CLIENT_ALLOCATOR='plattform': JAX takes default, "
                                                r"platform, bfc, cuda_async, vmm"):
    targets.usable_bytes(h100)
  # jaxlib reads them unstripped: " platform" and a set but empty allocator it refuses as the run starts (they were
  # taken for platform and for the default pool, and the child's compile was a traceback), a blank share as well.
  for allocator in (" platform", "platform ", ""):
    monkeypatch.setenv("XLA_PYTHON_CLIENT_ALLOCATOR", allocator)
    with pytest.raises(targets.TargetError, match=f"XLA_PYTHON_CLIENT_ALLOCATOR={allocator!r}: JAX takes default"):
      targets.usable_bytes(h100)
    assert targets.memory_pool(targets.TPUS["v5e"]) == (1.0, "")  # a TPU's run reads none of it
  monkeypatch.setenv("XLA_PYTHON_CLIENT_ALLOCATOR", "Platform")  # jaxlib lower-cases it
  assert targets.usable_bytes(h100) == int(whole)
  monkeypatch.delenv("XLA_PYTHON_CLIENT_ALLOCATOR")
  monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", " ")
  with pytest.raises(targets.TargetError, match=r"XLA_CLIENT_MEM_FRACTION=' ': give the share"):
    targets.usable_bytes(h100)
  monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", " .9")  # float() reads it, as jaxlib's does
  assert targets.memory_pool(h100.chip) == (0.9, "XLA_CLIENT_MEM_FRACTION=.9")
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", " ")  # set, to jaxlib: the pair it refuses
  with pytest.raises(targets.TargetError, match=r"are both set"):
    targets.usable_bytes(h100)


def test_the_command_line_takes_the_config_overrides_emim_main_takes(capsys):
  config = f"--config={REPO / 'configs' / 'cifar10.py'}"
  args = cli.parse_args([config, "--target=h100:8", "--config.model.fused_views=True", "--config.train.batch_size",
                         "512", "--programs=train,model"])
  assert args.config.model.fused_views is True and args.config.train.batch_size == 512
  assert args.programs == ["train", "model"] and args.target == "h100:8"
  # The compiling child gets the same config and overrides.
  argv = supervisor._child_argv(args, ["model"], False, False)
  assert argv[3:] == [config, "--config.model.fused_views=True", "--config.train.batch_size", "512",
                      "--target=h100:8", "--programs=model", "--no_header"]
  assert cli.parse_args([config, "--topology=v5e:2x4"]).target == "v5e:2x4"  # the old script's name
  for argv, says in ((["--config.model.fused_view=True"], "cannot apply --config.model.fused_view"),
                     (["--programs=train,gpu"], "--programs: name only programs of train,mi,features,probe,model")):
    with pytest.raises(SystemExit) as exit:
      cli.parse_args([config, "--target=h100:8", *argv])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and says in err and "Traceback" not in err, err


def test_the_train_step_compiles_for_a_host_of_h100s():
  """A real compile for 8 H100s, where jax's CUDA plugin is installed (docs/aot.md:
  /path/to/venv-with-the-plugin/bin/python -m pytest tests/test_aot.py -k h100s)."""
  if not targets.cuda_plugin_installed():
    pytest.skip('jax\'s CUDA plugin is not installed: pip install -e ".[cuda-aot]" (docs/aot.md)')
  config = load_config("synthetic", "runlocal")
  h100 = targets.target_devices("h100:8")
  assert len(h100.devices) == 8 and h100.devices[0].device_kind == "NVIDIA H100 80GB HBM3"
  r = report.compile_config(config, h100, ("train",))[0]
  assert not r.error, r.error
  assert 0 < r.total < h100.chip.hbm_gib * 2**30 and r.cost_source == "lowered" and r.flops > 0
  state, _ = train.state_shapes(train.build_parts(config, config.data.num_classes, 10, 100),
                                sharding.make_mesh(h100.devices))
  grad_bytes = sum(4 * int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  reduce = r.collectives["all-reduce"]
  assert reduce.widest_group == 8 and reduce.bytes >= grad_bytes
  assert f"f32[{config.train.batch_size // 8}," in r.hlo  # each GPU its share of the batch


def test_the_state_is_laid_out_as_the_runs_sharding_rule_says():
  """The programs compiled ahead of time hold the train state as the run will: with
  config.sharding.params=fsdp the state's arrays arrive split over the devices (they
  were compiled replicated whatever the config said)."""
  from emim.aot import programs

  mesh = sharding.make_mesh(jax.devices()[:8])

  def split_arguments(rule):
    config = load_config("synthetic", "runlocal")
    with config.unlocked():
      config.sharding.params, config.sharding.fsdp_min_mib = rule, 0.0
    text = programs.lower_programs(config, mesh, ("train",))["train"][0].as_text()
    arguments = text[text.index("func.func public @main"):]
    arguments = arguments[:arguments.index(") -> (")].split("%arg")[1:]
    return sum('"data"' in a for a in arguments)  # split over the data axis (shardy's or GSPMD's words)

  replicated, fsdp = split_arguments("replicate"), split_arguments("fsdp")
  assert fsdp > replicated + 20, (replicated, fsdp)  # dozens of the state's arrays split, not one or two


# A compiled program's text, as a TPU compiler writes it, cut down: a loop of 4 trips, an
# unnamed prefetch into on-chip memory (S(1)) used by the target's forward, a fusion of
# the online encoder's backward, a collective.
_TINY_HLO = """HloModule tiny

%cond (p: (s32[], f32[8,128])) -> pred[] {
  %p = (s32[], f32[8,128]{1,0:T(8,128)}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[]{:T(128)} constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %p = (s32[], f32[8,128]{1,0:T(8,128)}) parameter(0)
  %x = f32[8,128]{1,0:T(8,128)} get-tuple-element(%p), index=1
  %y = f32[8,128]{1,0:T(8,128)} fusion(%x), kind=kLoop, calls=%f, metadata={op_name="jit(train_step)/augment/vmap()/mul"}
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[8,128]{1,0:T(8,128)}) tuple(%i, %y)
}

ENTRY %main (a: f32[8,3], w: bf16[256,128]) -> f32[8,3] {
  %a = f32[8,3]{1,0:T(8,128)} parameter(0)
  %w = bf16[256,128]{1,0:T(8,128)(2,1)} parameter(1)
  %cs = (bf16[256,128]{1,0:T(8,128)(2,1)S(1)}, bf16[256,128]{1,0:T(8,128)(2,1)}, u32[]{:S(2)}) copy-start(%w)
  %cd = bf16[256,128]{1,0:T(8,128)(2,1)S(1)} copy-done(%cs)
  %g = f32[8,3]{1,0:T(8,128)} fusion(%a, %cd), kind=kOutput, calls=%f2, metadata={op_name="jit(train_step)/jvp(target)/Encoder/backbone/conv"}
  %b = f32[8,3]{1,0:T(8,128)} fusion(%g), kind=kLoop, calls=%f3, metadata={op_name="jit(train_step)/transpose(jvp(online))/Encoder/backbone/conv"}
  %r = f32[8,3]{1,0:T(8,128)} all-reduce(%b), replica_groups={}, to_apply=%add
  %init = (s32[], f32[8,128]{1,0:T(8,128)}) tuple(%a, %a)
  %loop = (s32[], f32[8,128]{1,0:T(8,128)}) while(%init), condition=%cond, body=%body
  ROOT %out = f32[8,3]{1,0:T(8,128)} copy(%r)
}
"""


def test_the_bytes_by_piece_pad_tiles_count_each_trip_and_give_prefetches_to_their_users():
  from emim.aot import pieces

  assert pieces.array_bytes("f32[8,3]{1,0:T(8,128)}") == 8 * 128 * 4  # the minor dimension padded to 128
  assert pieces.array_bytes("u8[2,5]{1,0:T(32,128)(4,1)}") == 32 * 128  # 2 padded to 32, 5 to 128
  assert pieces.array_bytes("f32[8,3]") == 8 * 3 * 4  # no tiles (a CPU's or GPU's layout)
  assert pieces.array_bytes("bf16[256,128]{1,0:T(8,128)(2,1)S(1)}", hbm_only=True) == 0  # on-chip
  every, main = pieces.bytes_by_piece(_TINY_HLO)
  tile = 8 * 128 * 4  # every f32[8,3] and f32[8,128] here
  weight = 256 * 128 * 2
  assert every["augmentation, two views"] == 4 * 2 * tile  # the loop's fusion, read and written, 4 trips
  # The target's fusion reads a and the prefetched weight, writes g; the unnamed prefetch
  # (read from main memory, written on chip) is the target's too, as its user is.
  assert every["target forward"] == 2 * tile + weight + 2 * weight
  assert main["target forward"] == 2 * tile + weight
  assert every["online encoder backward"] == 2 * tile
  assert every[pieces.COLLECTIVES] == 2 * tile
  # Unnamed, used by nothing named: the final copy, and the loop's test of each trip.
  assert every[pieces.UNNAMED] == 2 * tile + 4 * (1 + 4 + 4)


def test_the_compiled_steps_bytes_are_given_to_its_named_pieces(compiled):
  from emim.aot import pieces

  _, _, report = compiled["imagenet1k", "v5e:2x2"]
  every, main = pieces.bytes_by_piece(report.hlo)
  for piece in ("augmentation, two views", "online encoder forward", "online encoder backward", "target forward",
                "objective", "optimiser update", "online probe", "non-finite guard", "metrics", pieces.COLLECTIVES):
    assert every[piece] > 0, piece
  total = sum(every.values())
  assert every[pieces.UNNAMED] + every[pieces.REST] < 0.1 * total, dict(every)
  assert all(main[k] <= every[k] for k in every)
  # The same program as the compiler's cost analysis counts it (which counts a loop's body
  # once, and an asynchronous copy otherwise): the same order of magnitude.
  assert 0.5 < total / report.bytes_accessed < 2.0


_SCAN_HLO = """HloModule scan

%slice_layer (stack: f32[24,8,128], i: s32[]) -> f32[1,8,128] {
  %stack = f32[24,8,128]{2,1,0:T(8,128)} parameter(0)
  %i = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %one = f32[1,8,128]{2,1,0:T(8,128)} dynamic-slice(%stack, %i, %z, %z), dynamic_slice_sizes={1,8,128}
}

%put_layer (grads: f32[24,8,128], g: f32[1,8,128], i: s32[]) -> f32[24,8,128] {
  %grads = f32[24,8,128]{2,1,0:T(8,128)} parameter(0)
  %g = f32[1,8,128]{2,1,0:T(8,128)} parameter(1)
  %i = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %out = f32[24,8,128]{2,1,0:T(8,128)} dynamic-update-slice(%grads, %g, %i, %z, %z)
}

%body (p: (s32[], f32[24,8,128], f32[24,8,128])) -> (s32[], f32[24,8,128], f32[24,8,128]) {
  %p = (s32[], f32[24,8,128]{2,1,0:T(8,128)}, f32[24,8,128]{2,1,0:T(8,128)}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %w = f32[24,8,128]{2,1,0:T(8,128)} get-tuple-element(%p), index=1
  %acc = f32[24,8,128]{2,1,0:T(8,128)} get-tuple-element(%p), index=2
  %layer = f32[1,8,128]{2,1,0:T(8,128)} fusion(%w, %i), kind=kLoop, calls=%slice_layer, metadata={op_name="jit(train_step)/jvp(online)/Encoder/backbone/blocks/while/body/dynamic_slice"}
  %new = f32[24,8,128]{2,1,0:T(8,128)} fusion(%acc, %layer, %i), kind=kLoop, calls=%put_layer, metadata={op_name="jit(train_step)/transpose(jvp(online))/Encoder/backbone/blocks/while/body/dynamic_update_slice"}
  ROOT %t = (s32[], f32[24,8,128]{2,1,0:T(8,128)}, f32[24,8,128]{2,1,0:T(8,128)}) tuple(%i, %w, %new)
}

%cond (p: (s32[], f32[24,8,128], f32[24,8,128])) -> pred[] {
  %p = (s32[], f32[24,8,128]{2,1,0:T(8,128)}, f32[24,8,128]{2,1,0:T(8,128)}) parameter(0)
  ROOT %lt = pred[] fusion(%p), kind=kLoop, calls=%cmp
}

%small (x: f32[8,128]) -> f32[8,128] {
  %x = f32[8,128]{1,0:T(8,128)} parameter(0)
  ROOT %y = f32[8,128]{1,0:T(8,128)} fusion(%x), kind=kLoop, calls=%f, metadata={op_name="jit(train_step)/transpose(jvp(target))/Encoder/a"}
}

%large (x: f32[8,128]) -> f32[8,128] {
  %x = f32[8,128]{1,0:T(8,128)} parameter(0)
  %y = f32[8,128]{1,0:T(8,128)} fusion(%x), kind=kLoop, calls=%f, metadata={op_name="jit(train_step)/transpose(jvp(target))/Encoder/b"}
  ROOT %z = f32[8,128]{1,0:T(8,128)} fusion(%y), kind=kLoop, calls=%f, metadata={op_name="jit(train_step)/transpose(jvp(target))/Encoder/c"}
}

ENTRY %main (w: f32[24,8,128], x: f32[8,128], b: pred[]) -> f32[8,128] {
  %w = f32[24,8,128]{2,1,0:T(8,128)} parameter(0)
  %x = f32[8,128]{1,0:T(8,128)} parameter(1)
  %b = pred[] parameter(2)
  %z = s32[] constant(0)
  %init = (s32[], f32[24,8,128]{2,1,0:T(8,128)}, f32[24,8,128]{2,1,0:T(8,128)}) tuple(%z, %w, %w)
  %loop = (s32[], f32[24,8,128]{2,1,0:T(8,128)}, f32[24,8,128]{2,1,0:T(8,128)}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"24"}}
  %big = f32[1024,128]{1,0:T(8,128)} parameter(3)
  %ss = ((f32[1024,128]{1,0:T(8,128)}), f32[8,128]{1,0:T(8,128)S(1)}, u32[]{:S(2)}) slice-start(%big), slice={[0:8], [0:128]}
  %sd = f32[8,128]{1,0:T(8,128)S(1)} slice-done(%ss)
  %use = f32[8,128]{1,0:T(8,128)} fusion(%sd), kind=kLoop, calls=%f, metadata={op_name="jit(train_step)/jvp(target)/Encoder/d"}
  ROOT %c = f32[8,128]{1,0:T(8,128)} conditional(%b, %x, %x), true_computation=%small, false_computation=%large
}
"""


def test_the_bytes_of_a_scan_a_slice_prefetch_and_a_conditional_are_what_runs():
  """A scanned layer's fusion reads its layer out of the stack and writes its gradient in
  place (not the whole stack, 24 times); the trips from the compiler's known_trip_count
  (the compare fused away); a slice prefetched on chip moves the slice, not its source;
  a conditional counts its larger branch; the target's backward is its own piece."""
  from emim.aot import pieces

  every, main = pieces.bytes_by_piece(_SCAN_HLO)
  layer = 8 * 128 * 4
  index = 4  # the loop's counter, read by both fusions
  assert every["online encoder forward"] == 24 * (2 * layer + index)  # read one layer, write it: 24 trips
  assert every["online encoder backward"] == 24 * (2 * layer + index)  # read the update, write it in place
  assert every["target forward"] == 2 * layer + 2 * layer  # the prefetch (read, write on chip) and its user
  assert main["target forward"] == layer + layer  # main memory: the slice read, and the user's result
  assert every[pieces.TARGET_BACKWARD] == 2 * 2 * layer  # the larger branch: two fusions


def test_the_model_row_of_a_vit_is_the_runs_vit_and_its_step_lowers():
  # --breakdown and --programs=model on a ViT config raised KeyError('batch_stats') (a ViT has none), and the row's
  # ViT had 16-pixel patches at 224 whatever the config said (CIFAR's 4-pixel patches: 4 tokens instead of 64).
  from emim.aot.programs import _load_benchmark
  from emim.backbone import backbone_from_model_config, model_config_of

  config = load_config("cifar10", "vit_s,runlocal")
  step, init = _load_benchmark("train_step").model_step(config, "float32")
  params, stats, opt_state = jax.eval_shape(init, jax.random.PRNGKey(0))
  run = backbone_from_model_config(model_config_of(config), {})
  size = config.data.image_size
  expected = jax.eval_shape(lambda: run.model.init(jax.random.PRNGKey(0), np.zeros((1, size, size, 3)), train=False))
  shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)
  assert shapes(params["backbone"]) == shapes(expected["params"])
  assert stats["backbone"] == {}
  x = jax.ShapeDtypeStruct((4, size, size, 3), np.float32)
  (new_params, new_stats, _), loss = jax.eval_shape(step, (params, stats, opt_state), x, x)
  assert shapes(new_params) == shapes(params) and loss.shape == ()


def test_bytes_by_piece_without_a_train_step_says_whether_it_was_asked_for(capsys):
  # --breakdown --programs=mi said the train step "did not compile here", which it was never asked to.
  mi = types.SimpleNamespace(program="mi", error=None, hlo="HloModule mi")
  cli.print_bytes_by_piece([mi], "chip")
  assert "--programs has no train" in capsys.readouterr().out
  crashed = types.SimpleNamespace(program="train", error="compiler crash", hlo="")
  cli.print_bytes_by_piece([mi, crashed], "chip")
  assert "did not compile here" in capsys.readouterr().out


def test_a_shape_the_tpu_does_not_come_in_is_not_told_to_install_libtpu():
  # v5e:3x3 with libtpu installed said "(libtpu installs with pip install -e ".[tpu]")": the shape was wrong.
  pytest.importorskip("libtpu")
  with pytest.raises(targets.TargetError) as e:
    targets.target_devices("v5e:3x3")
  assert "pip install" not in str(e.value) and "docs/tpu.md" in str(e.value)


# ----------------------------------------------------------------------------------
# A careless user's command lines: each mistake one line, before any compile.
# ----------------------------------------------------------------------------------
def test_a_program_named_twice_compiles_once_and_a_negative_batch_is_one_line(capsys):
  # --programs=train,train compiled the step, then died of a KeyError on the second; --batch=-8 was a traceback.
  config = f"--config={REPO / 'configs' / 'synthetic.py'}:runlocal"
  assert cli.parse_args([config, "--target=h100:8", "--programs=train,mi,train,"]).programs == ["train", "mi"]
  with pytest.raises(SystemExit) as exit:
    cli.parse_args([config, "--target=h100:8", "--batch=-8"])
  err = capsys.readouterr().err.strip()
  assert exit.value.code == 2 and err.startswith("error: --batch=-8: give a positive global batch") and "\n" not in err


def test_a_config_emim_main_would_refuse_is_one_line_before_any_compile(monkeypatch, capsys):
  # --config.train.batch_size=0 and a batch over the training set were compiled, and were tracebacks.
  monkeypatch.setattr(cli, "supervise", lambda args: pytest.fail("a compile started"))
  config = f"--config={REPO / 'configs' / 'synthetic.py'}"  # 4096 examples
  for argv, says in ((["--config.train.batch_size=0"], "--config.train.batch_size=0: it must be a positive integer"),
                     (["--config.eval.batch_size=-1"], "--config.eval.batch_size=-1: it must be a positive integer"),
                     (["--batch=8192"], "The training set has 4096 examples, fewer than one batch of 8192: lower "
                                        "--batch")):
    with pytest.raises(SystemExit) as exit:
      cli.main([config, "--target=v5e:2x4", *argv])
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 1 and err.startswith(f"error: {says}") and "\n" not in err, err
  assert programs_lib.num_train_examples(load_config("imagenette", "")) == 9_469  # not the 4,096 of no dataset
  # An image folder of another name: the run counts it, data.num_train (4,096) is no count of it; not refused here.
  checked = []
  monkeypatch.setattr(cli, "supervise", lambda args: checked.append(args.batch) or 0)
  folder = f"--config={REPO / 'configs' / 'cifar10.py'}"
  with pytest.raises(SystemExit) as exit:
    cli.main([folder, "--target=v5e:2x4", "--config.data.tfds_name=", "--batch=8192"])
  assert exit.value.code == 0 and checked == [8192], capsys.readouterr().err
  with pytest.raises(SystemExit) as exit:  # as cifar10 it is 50,000
    cli.main([folder, "--target=v5e:2x4", "--batch=65536"])
  assert exit.value.code == 1 and "The training set has 50000 examples" in capsys.readouterr().err


def test_a_config_file_with_a_syntax_error_or_a_folder_is_one_line(tmp_path, capsys):
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(arg=None:\n  pass\n")
  no_config = tmp_path / "no_config.py"  # its get_config returns no ConfigDict: a traceback where it was read
  no_config.write_text("def get_config(arg=None):\n  return 3\n")
  for path, says in ((broken, f"{broken}, line 1: "), (REPO / "configs", "is a folder: give a config file in it"),
                     (no_config, "get_config(arg) returned int, not an ml_collections.ConfigDict")):
    with pytest.raises(SystemExit) as exit:
      cli.parse_args([f"--config={path}", "--target=h100:8"])
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and says in err and "\n" not in err and "Traceback" not in err, err


def test_an_unknown_config_field_is_named_as_one(capsys):
  # --config.foo=1 said only: cannot apply --config.foo: "'foo'".
  for field in ("foo", "model.foo.bar"):
    with pytest.raises(SystemExit):
      cli.parse_args([f"--config={REPO / 'configs' / 'synthetic.py'}", "--target=h100:8", f"--config.{field}=1"])
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot apply --config.{field}: the config has no field 'foo'\n"), err


def test_output_piped_to_head_stops_quietly_and_stops_the_compile(tmp_path):
  # ... | head -1 ended in a BrokenPipeError traceback.
  pid_file = tmp_path / "child.pid"
  child = (f"import os\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
           "while True: print('| row |', flush=True)")
  code = (f"import sys\nfrom emim.aot import cli, supervisor\ncli.supervise = lambda args: supervisor.supervise("
          f"args, lambda *_: [sys.executable, '-c', {child!r}])\n"
          f"cli.main(['--config={REPO / 'configs' / 'synthetic.py'}:runlocal', '--target=v5e:2x4'])")
  process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
  assert process.stdout.readline() == "| row |\n"
  process.stdout.close()  # as head does after its line
  _, err = process.communicate(timeout=60)
  assert process.returncode == 1 and err == "", err
  child_pid = int(pid_file.read_text())
  assert not os.path.exists(f"/proc/{child_pid}") or "zombie" in open(f"/proc/{child_pid}/status").read()


def test_jax_runs_on_the_cpu_whatever_jax_platforms_says():
  # JAX_PLATFORMS=cuda (a GPU machine's shell) without a GPU: the CUDA plugin's error, or JAX's traceback.
  # Its entry points (python -m emim.aot, run here without main(); benchmarks/tpu_compile.py) say so before JAX starts.
  for entry in ("runpy.run_module('emim.aot', run_name='entry')",
                f"runpy.run_path({str(REPO / 'benchmarks' / 'tpu_compile.py')!r}, run_name='entry')"):
    code = f"import runpy\n{entry}\nimport jax\nprint(jax.devices()[0].platform)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cuda"})
    assert result.returncode == 0 and result.stdout.strip() == "cpu", (entry, result.stderr)
  # Importing its modules does not: the test suite run with JAX_PLATFORMS=cuda, and its subprocesses, keep it.
  # Nor does it set libtpu's variables (a TPU VM's subprocesses would take this machine's stand-ins): a topology does.
  code = ("import os\nfrom emim.aot import cli\n"
          "print(os.environ['JAX_PLATFORMS'], os.environ.get('TPU_ACCELERATOR_TYPE'), os.environ.get('TPU_WORKER_HOSTNAMES'))")
  env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**env, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cuda"})
  assert result.returncode == 0 and result.stdout.strip() == "cuda None None", (result.stdout, result.stderr)


def test_an_xla_flag_xla_does_not_know_is_its_line_alone():
  # XLA_FLAGS=--xla_junk=1 printed the header and an empty table's, then XLA's line.
  result = subprocess.run([sys.executable, "-m", "emim.aot", f"--config={REPO / 'configs' / 'synthetic.py'}:runlocal",
                           "--target=v5e:2x4", "--programs=features"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "XLA_FLAGS": "--xla_junk=1"})
  assert result.returncode == 1 and result.stdout == "", result.stdout
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and "Unknown flag in XLA_FLAGS: --xla_junk=1" in lines[0], result.stderr


def test_a_program_the_run_does_not_have_is_a_row_saying_why(monkeypatch, capsys):
  # The Gaussian mixture's --programs=model,probe (and mi with no MI tracked) printed an empty table, exit status 0;
  # its --breakdown was a flax traceback (the model row's ResNet fed the mixture's vectors).
  pytest.importorskip("libtpu")
  config = f"--config={REPO / 'configs' / 'gaussian_mixture.py'}:runlocal"
  args = cli.parse_args([config, "--target=v5e:2x4", "--programs=model,probe,mi", "--config.eval.mi_every_steps=0"])
  assert cli.compile_and_print(args) == 0
  rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| model ", "| probe ", "| mi "))]
  assert rows == ["| model | not built: the model row is an image network's (benchmarks/train_step.py): the Gaussian "
                  "mixture's vectors have none |",
                  "| probe | not built: --config.eval.probe_mode='features': the probe trains on extracted features "
                  "(the features row's program), no step of its own |",
                  "| mi | not built: the run tracks no MI (--config.eval.mi_every_steps=0) |"]
  # Said before the compiles: a compiler's crash in a program after it (its child gone) does not lose it.
  seen = []
  monkeypatch.setattr(report, "compile_config", lambda *a, **k: seen.append(capsys.readouterr().out) or [])
  args = cli.parse_args([config, "--target=v5e:2x4", "--programs=probe,train"])
  assert cli.compile_and_print(args) == 0 and len(seen) == 1 and "\n| probe | not built: " in seen[0], seen
  monkeypatch.setattr(cli, "supervise", lambda args: pytest.fail("a compile started"))
  with pytest.raises(SystemExit) as exit:
    cli.main([config, "--target=v5e:2x4", "--breakdown"])
  err = capsys.readouterr().err.strip()
  assert exit.value.code == 1 and err.startswith("error: --breakdown: each piece is read against the model row") \
      and "\n" not in err, err


def test_help_is_the_usage_and_config_space_file_is_read_as_config_equals_file(tmp_path, capsys):
  # --help and -h were "Unknown command line flag", with "(--helpfull lists the flags)", itself unknown.
  for flag in ("--help", "-h", "--helpfull"):
    with pytest.raises(SystemExit) as exit:
      cli.parse_args([flag])
    out = capsys.readouterr().out
    assert exit.value.code == 0 and "python -m emim.aot --config=" in out and "--target: A TPU slice" in out
  # --help | head -1: a BrokenPipeError traceback.
  process = subprocess.Popen([sys.executable, "-m", "emim.aot", "--help"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
  process.stdout.close()  # as head does (here before the usage is written: importing JAX takes seconds)
  _, err = process.communicate(timeout=120)
  assert process.returncode in (0, 1) and err == "", err
  # --config FILE: a syntax error in it was a traceback, and the header named no config.
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(arg=None:\n  pass\n")
  with pytest.raises(SystemExit) as exit:
    cli.parse_args(["--config", str(broken), "--target=h100:8"])
  assert exit.value.code == 2 and f"error: {broken}, line 1: " in capsys.readouterr().err
  config = str(REPO / "configs" / "synthetic.py")
  args = cli.parse_args(["--config", f"{config}:runlocal", "--config.train.batch_size", "64", "--target=h100:8"])
  assert args.config_arg == f"{config}:runlocal" and args.overrides == ["--config.train.batch_size", "64"]
  assert args.config.train.batch_size == 64


def test_ctrl_c_while_it_starts_ends_it_quietly():
  # Ctrl-C while JAX was imported was a traceback, or landed in a garbage collector's callback ("Exception ignored")
  # and the compile went on to the end, exit status 0.
  import signal
  import time

  argv = [sys.executable, "-m", "emim.aot", f"--config={REPO / 'configs' / 'synthetic.py'}:runlocal",
          "--target=v5e:2x4", "--programs=features"]
  process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
  time.sleep(0.3)  # importing (JAX takes seconds); later, main() takes it: the same outcome
  os.killpg(process.pid, signal.SIGINT)  # as a terminal sends it, to the process and any child
  out, err = process.communicate(timeout=120)
  assert process.returncode in (-signal.SIGINT, 130) and "| features |" not in out, (out, err)
  assert "Traceback" not in err and "Exception ignored" not in err, err


def test_a_flagfile_reaches_the_compiling_child(tmp_path):
  # --flagfile=FILE with --config in it: the parent read it, the child was not given it ("Flag --config must have a
  # value other than None").
  flagfile = tmp_path / "flags.txt"
  flagfile.write_text(f"--config={REPO / 'configs' / 'synthetic.py'}:runlocal\n--target=h100:8\n")
  args = cli.parse_args([f"--flagfile={flagfile}", "--programs=train"])
  assert args.config_arg == f"--flagfile={flagfile}" and args.config.train.batch_size == 32
  argv = supervisor._child_argv(args, ["train"], True, False)
  assert argv[3:] == [f"--flagfile={flagfile}", "--target=h100:8", "--programs=train", "--nomax_batch", "--nobreakdown"]
  assert cli.parse_args(argv[3:]).config.train.batch_size == 32  # as the child reads it
  # A flagfile's --max_batch and --breakdown: the child after a crash of the train step does neither again.
  flagfile.write_text(flagfile.read_text() + "--max_batch\n--breakdown\n")
  args = cli.parse_args([f"--flagfile={flagfile}"])
  assert args.max_batch and args.breakdown and args.programs == ["train", "model"]
  child = cli.parse_args(supervisor._child_argv(args, ["model"], False, False)[3:])
  assert child.programs == ["model"] and not child.max_batch and not child.breakdown and child.no_header
  first = cli.parse_args(supervisor._child_argv(args, ["train", "model"], True, True)[3:])
  assert first.max_batch and first.breakdown and not first.no_header
  # --flagfile FILE, with a space, as absl also reads it: passed on to the child the same.
  args = cli.parse_args(["--flagfile", str(flagfile), "--nomax_batch"])
  assert args.config.train.batch_size == 32 and args.config_arg == f"--flagfile={flagfile}"
  assert supervisor._child_argv(args, ["train"], True, False)[3] == f"--flagfile={flagfile}"
  # -flagfile=FILE, one dash, as absl also reads it: the same.
  args = cli.parse_args([f"-flagfile={flagfile}", "--nomax_batch"])
  assert args.config.train.batch_size == 32 and args.config_arg == f"--flagfile={flagfile}"
  assert supervisor._child_argv(args, ["train"], True, False)[3] == f"--flagfile={flagfile}"



def test_a_flagfile_without_a_file_or_that_cannot_be_opened_is_one_line(tmp_path, capsys):
  # absl's IllegalFlagValueError and CantOpenFlagFileError were tracebacks: the config flag reads the flagfiles as
  # it is defined, before the parsing whose errors are one line.
  config = f"--config={REPO / 'configs' / 'synthetic.py'}:runlocal"
  missing = tmp_path / "missing.txt"
  nested = tmp_path / "nested.txt"
  nested.write_text(f"--flagfile={missing}\n")
  for argv, says in (([config, "--target=v5e:2x2", "--flagfile"], "--flagfile is followed by nothing, not a file"),
                     (["--flagfile", "--target=v5e:2x2"], "--flagfile is followed by --target=v5e:2x2, not a file"),
                     ([f"--flagfile={missing}"], f"No such file or directory: '{missing}': give --flagfile an existing"),
                     (["--flagfile", str(missing)], f"No such file or directory: '{missing}'"),
                     ([f"--flagfile={nested}"], f"No such file or directory: '{missing}'"),
                     ([f"--flagfile={tmp_path}"], f"Is a directory: '{tmp_path}'")):
    with pytest.raises(SystemExit) as exit:
      cli.parse_args(argv)
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and err.startswith("error: ") and says in err and "\n" not in err, (argv, err)
