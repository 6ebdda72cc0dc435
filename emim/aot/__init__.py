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

# libtpu reads these when JAX loads it (at the first topology), and would otherwise ask
# the cloud metadata server what machine this is, and warn that it could not. This
# machine runs JAX on its CPU; the TPU and GPU compilers are only asked for programs.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
# libtpu takes /tmp/libtpu_lockfile for a process's lifetime (one TPU user per VM); any
# JAX process here that probed for a TPU holds it. Compiling needs no chip to itself.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def on_this_cpu() -> None:
  """For the command line's entry points (python -m emim.aot, benchmarks/tpu_compile.py),
  before JAX is imported: JAX runs on this machine's CPU whatever JAX_PLATFORMS says (a
  shell set up for training may say cuda or tpu, and JAX without that device fails). The
  targets' compilers need no device, and the CPU's lowering gives a GPU program's FLOPs.
  Not done on import: a process that imports emim.aot's modules (the test suite) keeps
  the JAX_PLATFORMS it was given, and so do its subprocesses."""
  os.environ["JAX_PLATFORMS"] = "cpu"
