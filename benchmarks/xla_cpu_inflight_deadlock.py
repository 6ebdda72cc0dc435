"""A reproduction of the deadlock that hung the 8-device CPU test suite (issue 22), and of
emim's way around it (``train.DispatchWindow``).

    python benchmarks/xla_cpu_inflight_deadlock.py                 # unbounded: deadlocks
    python benchmarks/xla_cpu_inflight_deadlock.py --window 8      # train.DispatchWindow(8): done
    python benchmarks/xla_cpu_inflight_deadlock.py --stacks        # every thread's stack, by gdb

A program with an all-reduce over 8 simulated CPU devices, dispatched ``--steps`` times
without waiting (as the training loop dispatches up to a progress line ahead). XLA's CPU
client (xla/pjrt/cpu/cpu_client.cc, jaxlib 0.10.2) runs a multi-device program by
scheduling each device's launch (``ExecuteHelper``) on its pool of max(cores, devices)
threads; a launch takes one of its device's 32 in-flight slots there
(``max_inflight_computations_semaphore``), blocking its pool thread while they are all
taken; and each device's computation, an all-reduce participant, also needs a pool thread.
Some 40 dispatches ahead, on 2 cores (a pool of 8 threads), the pool holds only launches
waiting for slots and participants waiting at the all-reduce for participants that can
no longer get a thread. With ``--stacks`` a child process is left to deadlock and gdb
prints each thread's frames, grouped: the main thread in ``PjRtCpuExecutable::Execute``
awaiting its launches, pool threads in ``Semaphore::Acquire`` under ``ExecuteHelper``,
and participants in ``AwaitAndLogIfStuck`` under ``AllReduce``.

Each run's collective timeouts are short (--timeout_s), so a deadlock ends in XLA's
"Termination timeout ... only N of them arrived on time" abort instead of a hang.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import time

CHILD = """
import sys, time
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
steps, window = int(sys.argv[1]), int(sys.argv[2])
mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
x = jax.device_put(jnp.ones((8 * 64, 256)), NamedSharding(mesh, P("data")))
w = jax.device_put(jnp.full((256, 256), 1e-3), NamedSharding(mesh, P()))

@jax.jit
def step(w, x):
  y = jnp.tanh(x @ w)
  return w - 1e-3 * (y.T @ y) / y.shape[0]  # a reduction over the sharded batch: an all-reduce

from emim.train import DispatchWindow  # the training loop's own
in_flight = DispatchWindow(window or None)
start = time.perf_counter()
for i in range(steps):
  w = step(w, x)
  in_flight.dispatched(w)
jax.block_until_ready(w)
print(f"done: {steps} steps in {time.perf_counter() - start:.2f}s", flush=True)
"""


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(timeout_s: int) -> dict:
  flags = (f"--xla_force_host_platform_device_count=8 --xla_cpu_collective_timeout_seconds={timeout_s} "
           f"--xla_cpu_collective_call_terminate_timeout_seconds={timeout_s}")
  path = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
  return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONPATH=path)


def run(steps: int, window: int, timeout_s: int) -> tuple[str, str]:
  """("finished" | "deadlocked" | "failed", the line that says so)."""
  proc = subprocess.run([sys.executable, "-c", CHILD, str(steps), str(window)], capture_output=True, text=True,
                        env=child_env(timeout_s), timeout=timeout_s * 3 + 120)
  lines = (proc.stdout + proc.stderr).splitlines()
  if proc.returncode == 0:
    return "finished", next((line for line in lines if "done:" in line), "")
  stuck = [line for line in lines if "arrived" in line]
  if stuck:  # XLA's rendezvous gave up waiting for a collective's participants
    return "deadlocked", stuck[-1][:300]
  return "failed", f"exit {proc.returncode}: {(lines or [''])[-1][:300]}"


def stacks(steps: int, wait_s: float) -> str:
  """Leave an unbounded run to deadlock, then group its threads by their frames (gdb)."""
  proc = subprocess.Popen([sys.executable, "-c", CHILD, str(steps), "0"], env=child_env(3600),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    time.sleep(wait_s)
    if proc.poll() is not None:
      return f"the run finished (exit {proc.returncode}) within {wait_s:.0f}s: no deadlock to show"
    text = subprocess.run(["gdb", "-p", str(proc.pid), "-batch", "-ex", "thread apply all bt 30"],
                          capture_output=True, text=True, timeout=300).stdout
  finally:
    proc.kill()
  keys = ("Semaphore", "Acquire", "ExecuteHelper", "Execute", "AwaitAndLogIfStuck", "AllReduce", "BlockUntilReady",
          "WorkerLoop", "AwaitCommon")
  groups = collections.Counter()
  for thread in re.split(r"\n(?=Thread \d+ )", text):
    if not thread.startswith("Thread"):
      continue
    frames = re.findall(r"#\d+\s+(?:0x[0-9a-f]+ in )?([^\s(]+)", thread)
    marked = [f.split("::")[-1] for f in frames if any(k in f for k in keys)]
    groups[" <- ".join(marked[:5]) or "(other)"] += 1
  return "\n".join(f"{count:3d} thread(s): {frames}" for frames, count in groups.most_common())


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--window", type=int, default=0, help="steps in flight at most; 0: no limit")
  p.add_argument("--timeout_s", type=int, default=10, help="XLA's collective timeouts in the runs")
  p.add_argument("--stacks", action="store_true", help="show the deadlocked threads' frames (needs gdb)")
  args = p.parse_args()
  if args.stacks:
    print(stacks(args.steps, wait_s=20.0))
    return
  outcome, line = run(args.steps, args.window, args.timeout_s)
  print(f"{args.steps} steps, {'at most ' + str(args.window) + ' more' if args.window else 'unbounded'} in flight: "
        f"{outcome} ({line})")
  sys.exit(0 if outcome == "finished" else 1)


if __name__ == "__main__":
  main()
