"""Every program a run uses, compiled ahead of time on this machine for the machine it
will run on, a Cloud TPU slice or a host of NVIDIA GPUs (neither needed here): what fits
in a device's memory, what a step costs, what its roofline allows.

    python -m emim.aot --config=configs/cifar10.py --target=h100:8
    python -m emim.aot --config=configs/imagenet1k.py --target=v5e:4x4 --config.train.batch_size=512
    python -m emim.aot --config=configs/cifar10.py --target=v5e:2x4 --max_batch

The modules, by concern: ``targets`` (the machines and their published specs),
``programs`` (emim's programs, lowered as a run builds them), ``report`` (a program
compiled and read), ``search`` (the largest batch that fits), ``supervisor`` (the
compiles in a child process a compiler crash cannot take down), ``cli`` (the command
line). docs/aot.md is the user's page.
"""

import os


def libtpu_environment() -> None:
  """Before the first TPU topology (libtpu reads these as JAX loads it): it would otherwise
  ask the cloud metadata server what machine this is, and warn that it could not; and it
  takes /tmp/libtpu_lockfile for a process's lifetime (one TPU user per VM), which any JAX
  process here that probed for a TPU holds, though compiling needs no chip to itself. Set
  where a topology is asked for, not on import: a process that imports emim.aot (the test
  suite on a TPU VM) and its subprocesses keep their own."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def on_this_cpu() -> None:
  """For the command line's entry points (python -m emim.aot, benchmarks/tpu_compile.py),
  before JAX is imported: JAX runs on this machine's CPU whatever JAX_PLATFORMS says (a
  shell set up for training may say cuda or tpu, and JAX without that device fails). The
  targets' compilers need no device, and the CPU's lowering gives a GPU program's FLOPs.
  Not done on import: a process that imports emim.aot's modules (the test suite) keeps
  the JAX_PLATFORMS it was given, and so do its subprocesses."""
  os.environ["JAX_PLATFORMS"] = "cpu"
