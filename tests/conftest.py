"""Test set-up: 8 fake CPU devices, set before JAX initialises, so sharding is tested.

Shared by the test files (``from conftest import ...``): the repository root, the
config loaders, the image-folder fixture and a GCS emulator for ``gs://`` work
directories."""

import os

# 8 simulated devices on a 2-core machine: a device thread can wait long for the others
# at a collective (BatchNorm and covariance statistics over the sharded batch); raise
# XLA:CPU's rendezvous timeouts (40 s) so a slow moment is not turned into an abort, but
# not so far that a real deadlock hangs CI: 5 minutes, then XLA aborts with the
# collective's name. (The suite's hang was XLA's CPU client deadlocking some 40
# multi-device programs dispatched ahead; train.DispatchWindow keeps 8 in flight.)
# XLA:CPU's fusion emitters off: the older loop emitter compiles the suite's tiny train
# steps in about two thirds of the time (the CIFAR-10 and synthetic runlocal steps on 8
# devices: 3.9-4.3 s against 5.9-6.7 s; three test files cold: 72 s of CPU against 101)
# and runs them about 6% slower (192 steps of the synthetic default: 48.6 s against 46.0),
# where most of the suite's CPU time is compiling (BENCHMARKS.md, "The test suite's time").
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_cpu_collective_timeout_seconds=300 "
    "--xla_cpu_collective_call_terminate_timeout_seconds=300 --xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most of the suite's time is XLA:CPU compiling tiny train steps that then run a few
# steps: skip XLA's expensive optimisation passes. Results may differ from an optimised
# build in the last bits; the tests compare within tolerances, or programs compiled alike
# (a resumed run against an uninterrupted one). Cold compile cache, 2 cores: 8 min 13 s
# (.ci/run in a clean clone, the suite of 2026-11-22) with this, 12 min 38 s to 12 min 58 s
# without. The suite of 2026-11-23 (157 tests): 15 min 52 s cold in a clean clone, 11 min
# 00 s warm; of 2026-11-30 (185 tests, two worker processes, programs compiled once per
# process): 9 min 37 s to 9 min 59.6 s cold, three runs in a row (BENCHMARKS.md,
# "The test suite's time").
# Subprocesses (the program tests) inherit it.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Compiled programs are cached on disk: runs that compile the same step (resume tests,
# the evaluation fixture) compile once. Keys include the JAX version, so stale entries
# are never used.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/emim/jax-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import logging  # noqa: E402
import pathlib  # noqa: E402
import socket  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
CIFAR_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


def load_config(name="synthetic", variant="runlocal"):
  """``configs/<name>.py:<variant>``, as the command line loads it."""
  from emim.config_base import load_config_file

  return load_config_file(REPO / "configs" / f"{name}.py", variant)


def tiny_synthetic(variant="runlocal", **overrides):
  """The synthetic config's runlocal variant, 4 steps, with dotted-key overrides."""
  return tiny_config("synthetic", variant, **overrides)


def tiny_config(name, variant="runlocal", **overrides):
  """``configs/<name>.py:<variant>``, 4 steps, with dotted-key overrides."""
  config = load_config(name, variant)
  with config.unlocked():
    config.train.num_steps, config.train.log_every = 4, 2
    for key, value in overrides.items():
      node = config
      *path, leaf = key.split(".")
      for p in path:
        node = node[p]
      node[leaf] = value
  return config


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="session")
def cifar_archive():
  """The shared CIFAR-10 image folder archive; skips when ../shared/data is absent."""
  if not CIFAR_ARCHIVE.exists():
    pytest.skip(f"needs the shared CIFAR-10 archive at {CIFAR_ARCHIVE} (absent here)")
  return CIFAR_ARCHIVE


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
  """An image-folder directory: train/ and test/ of 20x20 PNGs in 4 classes (16 and 4 per
  class), for the streaming (Grain) paths."""
  root = tmp_path_factory.mktemp("folder")
  rng = np.random.default_rng(0)
  for split, per_class in (("train", 16), ("test", 4)):
    for c in range(4):
      (root / split / f"c{c}").mkdir(parents=True)
      for i in range(per_class):
        image = np.clip(rng.normal(60 * c + 30, 20, (20, 20, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / split / f"c{c}" / f"{i}.png")
  return root


def _with_generation_headers(handler):
  """A GCS emulator handler that also sends GCS's x-goog-generation headers: the
  emulator leaves them out of media downloads, and TensorStore reads the generation of a
  ranged read from them (one of 0 then fails its next conditional request as "Malformed
  StorageGeneration", which happened when the suite loaded the machine)."""

  def handle(request, response, storage, *args, **kwargs):
    handler(request, response, storage, *args, **kwargs)
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # not an object (a 404 was answered)
      return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj["metageneration"])

  return handle


@pytest.fixture(scope="session")
def fake_gcs():
  """A Google Cloud Storage emulator on localhost (gcp-storage-emulator, in memory), with
  both clients emim's gs:// paths use pointed at it: gcsfs under etils.epath (files) and
  TensorStore under Orbax (checkpoint arrays). Yields a bucket URL, "gs://emim-test"."""
  emulator = pytest.importorskip("gcp_storage_emulator.server", reason="pip install -e .[test] installs the GCS emulator")
  pytest.importorskip("gcsfs", reason="pip install -e .[gcs] installs gcsfs")
  from gcp_storage_emulator.handlers import objects

  for _, handlers in emulator.HANDLERS:
    for method, handler in list(handlers.items()):
      if handler in (objects.get, objects.download):
        handlers[method] = _with_generation_headers(handler)
  for name in ("gcsfs", "gcp_storage_emulator", "google.auth"):  # credential and 404 chatter
    logging.getLogger(name).setLevel(logging.CRITICAL)
  port = free_port()
  server = emulator.create_server("localhost", port, in_memory=True, default_bucket="emim-test")
  server.start()
  url = f"http://localhost:{port}"
  saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING")}
  os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url, GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator")
  yield "gs://emim-test"
  server.stop()
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value



def pytest_configure(config):
  """Two worker processes by default (pytest-xdist, in the test extra), each a whole test
  file at a time so that a file's module fixtures are built once; `-n 0` runs in this
  process, and without pytest-xdist the suite runs in one process as before. (Set here,
  before xdist's own pytest_configure starts the workers, rather than in pytest.ini's
  addopts, which would break a pytest without xdist.)"""
  if (config.pluginmanager.hasplugin("xdist") and not hasattr(config, "workerinput")
      and config.getoption("numprocesses", None) is None and not config.getoption("collectonly", False)):
    config.option.numprocesses = 2
    config.option.tx = ["popen"] * 2
    if config.getoption("dist", "no") == "no":
      config.option.dist = "loadfile"
