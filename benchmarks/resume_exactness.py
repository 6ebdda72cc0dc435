"""Does a preempted and restarted run equal an uninterrupted one, to the bit, here?

    python benchmarks/resume_exactness.py --config=configs/cifar10.py --steps 40 --stop 20 \
        --set data.path=.accel/cifar10-jpeg.tar.gz [--deterministic]
    python benchmarks/resume_exactness.py --config=configs/synthetic.py:runlocal --steps 6 --stop 3   # CPU

Runs ``python -m emim.main`` three times, each a fresh process as after a real
preemption: ``steps`` steps straight; then, in another work directory, ``--stop_at_step``
and a restart that finishes. Compares every saved field of the two final checkpoints
(params, batch statistics, EMA target, optimiser, probe, objective state) and prints the
largest absolute difference. On CPU the tests check this in one process; on a GPU it
depends on XLA's kernels and autotuning, which ``--deterministic``
(``config.train.deterministic``, the config default) pins down; without the flag the
runs use XLA's default kernels.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def train(config: str, workdir: str, overrides: list[str], stop: int | None = None) -> None:
  command = [sys.executable, "-m", "emim.main", f"--config={config}", f"--workdir={workdir}", *overrides]
  if stop is not None:
    command.append(f"--stop_at_step={stop}")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
  result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
  if result.returncode:
    sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/cifar10.py", help="config file[:variant]")
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--stop", type=int, default=20)
  parser.add_argument("--deterministic", action="store_true", help="XLA's deterministic GPU kernels")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override, e.g. train.batch_size=512")
  args = parser.parse_args()
  overrides = [f"--config.{item}" for item in args.set] + [
      f"--config.train.num_steps={args.steps}", f"--config.train.deterministic={args.deterministic}",
      "--config.eval.every_steps=0"]
  from emim.checkpoint import restore_subtree  # after the runs: this process needs no accelerator until here
  import jax

  with tempfile.TemporaryDirectory() as tmp:
    train(args.config, f"{tmp}/straight", overrides)
    train(args.config, f"{tmp}/resumed", overrides, stop=args.stop)
    train(args.config, f"{tmp}/resumed", overrides)
    _, straight = restore_subtree(f"{tmp}/straight/checkpoints", args.steps, None)
    _, resumed = restore_subtree(f"{tmp}/resumed/checkpoints", args.steps, None)
  worst = {}
  for field in straight:
    pairs = zip(jax.tree.leaves(straight[field]), jax.tree.leaves(resumed[field]))
    worst[field] = max((float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0))
                        for a, b in pairs), default=0.0)
  device = jax.devices()[0]
  print(f"device: {device.platform} x{jax.device_count()} ({device.device_kind}), jax {jax.__version__}, {args.config}, "
        f"{args.steps} steps, restarted after {args.stop}, deterministic={args.deterministic}")
  for field, diff in worst.items():
    print(f"  {field:16s} max |straight - resumed| = {diff:.3g}")
  print("bitwise equal:", all(d == 0.0 for d in worst.values()))


if __name__ == "__main__":
  main()
