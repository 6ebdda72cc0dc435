"""Forward + gradient cost of each log-determinant backend and of the full EMMI loss.

    python benchmarks/objective_cost.py                # d in {512, 2048, 4096}
    python benchmarks/objective_cost.py --dims 512     # quicker

Each row: a d x d covariance from n = d/4 samples (the spec's measured shapes), the
time of jit(value_and_grad) per call, and its ratio to the Cholesky backend measured in
the same run. On CPU only the ratios are meaningful; absolute times are for accelerators.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import emim.objectives as O


def time_call(fn, *args, repeats: int) -> float:
  """Median seconds per call of a jitted fn, after one compile-and-warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def logdet_cases(d: int) -> dict[str, O.LogdetConfig]:
  return {
      "eigh": O.LogdetConfig(backend="eigh", gram=False),
      "cholesky": O.LogdetConfig(backend="cholesky", gram=False),
      "taylor-4": O.LogdetConfig(backend="taylor", order=4, gram=False),
      "taylor-4 gram": O.LogdetConfig(backend="taylor", order=4, gram=True),
      "cholesky gram": O.LogdetConfig(backend="cholesky", gram=True),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dims", type=int, nargs="+", default=[512, 2048, 4096])
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  print(f"{'d':>5} {'n':>5}  {'what':<26} {'ms/call':>9} {'vs cholesky':>12}")
  for d in args.dims:
    n = d // 4
    key = jax.random.PRNGKey(d)
    z1 = jax.random.normal(key, (n, d))
    z2 = z1 + 0.5 * jax.random.normal(jax.random.fold_in(key, 1), (n, d))
    x = O.centred(z1) / jnp.sqrt(n)
    rows = {}
    for name, cfg in logdet_cases(d).items():
      state = O.init_eig_state(d)
      fn = jax.jit(jax.value_and_grad(lambda x, s, cfg=cfg: O.covariance_logdet(x, cfg, s)[0]))
      rows[f"logdet {name}"] = time_call(fn, x, state, repeats=args.repeats)
    for backend in ["cholesky", "taylor"]:
      cfg = O.EmmiConfig(logdet=O.LogdetConfig(backend=backend))
      state = O.init_emmi_state(d, cfg)
      fn = jax.jit(jax.value_and_grad(lambda a, b, s, cfg=cfg: O.emmi_loss(a, b, s, cfg)[0]))
      rows[f"emmi loss ({backend})"] = time_call(fn, z1, z2, state, repeats=args.repeats)
    reference = rows["logdet cholesky"]
    for name, seconds in rows.items():
      print(f"{d:>5} {n:>5}  {name:<26} {seconds * 1e3:>9.2f} {seconds / reference:>11.2f}x", flush=True)


if __name__ == "__main__":
  main()
