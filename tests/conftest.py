"""Test set-up: 8 fake CPU devices, set before JAX initialises, so sharding is tested."""

import os

# 8 simulated devices on a 2-core machine: a device thread can wait long for the others
# at a collective (BatchNorm and covariance statistics over the sharded batch); raise
# XLA:CPU's rendezvous timeouts so a slow moment is not turned into an abort.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_cpu_collective_timeout_seconds=1800 "
    "--xla_cpu_collective_call_terminate_timeout_seconds=1800")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most of the suite's time is XLA:CPU compiling tiny train steps that then run a few
# steps: skip XLA's expensive optimisation passes. Results may differ from an optimised
# build in the last bits; the tests compare within tolerances, or programs compiled alike
# (a resumed run against an uninterrupted one). Cold compile cache, 2 cores: 8 min 13 s
# (.ci/run in a clean clone) with this, 12 min 38 s to 12 min 58 s without.
# Subprocesses (the program tests) inherit it.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Compiled programs are cached on disk: runs that compile the same step (resume tests,
# the evaluation fixture) compile once. Keys include the JAX version, so stale entries
# are never used.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/emim/jax-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pathlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
CIFAR_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


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
