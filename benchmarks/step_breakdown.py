"""The train step's time, component by component (issue 14): where the milliseconds
between a step and its network's bare forward/backward go.

    python benchmarks/step_breakdown.py --config=configs/cifar10.py --batch 256 512 --out=$OUT/breakdown
    python benchmarks/step_breakdown.py --config=configs/cifar10.py:barlow_twins --batch 256
    python benchmarks/step_breakdown.py --config=configs/synthetic.py:runlocal --batch 32 --steps 3   # CPU smoke

Each component is jitted alone, on the step's real shapes and modules, and timed as the
mean of ``--steps`` back-to-back calls after a warm-up (one wait at the end, as the
training loop dispatches); then the whole step as the training loop compiles it
(``train.compile_train_step``: gather, augmentation, step and interval metrics in one
program), with a forward per view and with both views fused (``model.fused_views``).
Components overlap and fuse inside the whole step, so they need not add up to it; the
table shows each as a share of the whole. Prints a markdown table and writes it, with
the figures as JSON, to ``--out``. On a CPU read the ratios only; absolute figures count
only from an accelerator.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from emim import objectives as O
from emim import sharding, step_metrics, train
from emim.config_base import VECTOR_SOURCES, load_config_file
from emim.data.pipeline import DeviceData
from emim.data.dataset import ImageDataset
from emim.methods import Views
from emim.target import ema_update
from emim.train_step import _apply, _apply_views, gather_batch, init_state, make_views


def mean_seconds(fn, args, steps: int, warmup: int = 3) -> float:
  """Mean seconds per call of a jitted ``fn(*args)`` over ``steps`` calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  for _ in range(steps):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / steps


def compiled_full_step(config, dataset: ImageDataset, mesh):
  """The training loop's own program (``train.compile_train_step``), compiled, with a
  fresh state and its data: (step, state, data, empty interval)."""
  data = DeviceData(dataset, mesh, config.train.batch_size)
  n = len(dataset)
  parts = train.build_parts(config, config.data.num_classes, n // config.train.batch_size, 10_000)
  replicated = sharding.replicated(mesh)
  abstract = jax.eval_shape(functools.partial(init_state, parts), jax.random.PRNGKey(0))
  state_sharding = jax.tree.map(lambda _: replicated, abstract)
  state = jax.jit(functools.partial(init_state, parts), out_shardings=state_sharding)(jax.random.PRNGKey(0))
  step, empty = train.compile_train_step(parts, data, state, state_sharding, mesh)
  return step, state, data, empty


def full_step_seconds(config, dataset: ImageDataset, mesh, steps: int, compiled=None) -> float:
  """The training loop's own program: a step threading the state, donated (``compiled``:
  from ``compiled_full_step``, made here when not given)."""
  step, state, data, empty = compiled or compiled_full_step(config, dataset, mesh)
  for _ in range(3):
    state, _ = step(state, data.next_input(), empty)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, interval = step(state, data.next_input(), empty)
  jax.block_until_ready(state)
  return (time.perf_counter() - t0) / steps


def component_seconds(config, dataset: ImageDataset, mesh, steps: int) -> dict[str, float]:
  """Seconds per call of each piece of the step, alone."""
  batch_size = config.train.batch_size
  parts = train.build_parts(config, config.data.num_classes, len(dataset) // batch_size, 10_000)
  fused = train.build_parts(_with(config, fused_views=True), config.data.num_classes, len(dataset) // batch_size, 10_000)
  replicated, batch_spec = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  state = jax.jit(functools.partial(init_state, parts), out_shardings=replicated)(jax.random.PRNGKey(0))
  on_device = {"images": sharding.put_global(dataset.images, replicated),
               "labels": sharding.put_global(dataset.labels, replicated)}
  jit = functools.partial(jax.jit)
  out = {}

  gather = jit(lambda d, rng, step: gather_batch(d, rng, step, batch_size, batch_spec))
  out["data gather"] = mean_seconds(gather, (on_device, state.rng, state.step), steps)
  batch = gather(on_device, state.rng, state.step)
  views = jit(lambda rng, step, b: make_views(parts, rng, step, b))
  out["augmentation (two views)"] = mean_seconds(views, (state.rng, state.step, batch), steps)
  x1, x2 = views(state.rng, state.step, batch)

  enc_params, enc_stats = state.params["encoder"], state.batch_stats["encoder"]

  def online(params, x):  # forward and backward of one view, a unit cotangent
    def f(p):
      (feats, z), stats = _apply(parts.encoder, p, enc_stats, x)
      return jnp.sum(z) + 0.0 * jnp.sum(feats), stats
    return jax.grad(f, has_aux=True)(params)

  out["online fwd+bwd, view 1"] = mean_seconds(jit(online), (enc_params, x1), steps)
  out["online fwd+bwd, view 2"] = out["online fwd+bwd, view 1"]

  def online_fused(params, x1, x2):
    def f(p):
      ((_, z1), (_, z2)), stats = _apply_views(fused.encoder, fused.views_encoder, p, enc_stats, x1, x2)
      return jnp.sum(z1) + jnp.sum(z2), stats
    return jax.grad(f, has_aux=True)(params)

  out["online fwd+bwd, both views fused"] = mean_seconds(jit(online_fused), (enc_params, x1, x2), steps)
  z1, z2 = (jit(lambda p, x: _apply(parts.encoder, p, enc_stats, x)[0][1])(enc_params, x) for x in (x1, x2))
  if state.target is not None:
    tp, ts = state.target["params"], state.target["batch_stats"]
    target = jit(lambda x: _apply(parts.encoder, tp, ts, x)[0][1])
    out["target forward, view 1"] = out["target forward, view 2"] = mean_seconds(target, (x1,), steps)
    both = jit(lambda a, b: _apply_views(fused.encoder, fused.views_encoder, tp, ts, a, b)[0])
    out["target forward, both views fused"] = mean_seconds(both, (x1, x2), steps)
  pred = None
  if parts.predictor is not None:
    pp, ps = state.params["predictor"], state.batch_stats["predictor"]

    def predictor(p, a, b):
      return jax.grad(lambda q: sum(jnp.sum(y) for y in _apply_views(parts.predictor, None, q, ps, a, b)[0]))(p)

    out["predictor fwd+bwd, two views"] = mean_seconds(jit(predictor), (pp, z1, z2), steps)
    pred = (z1, z2)

  def loss(z1, z2):
    v = Views((z1, z2), pred, (z2, z1) if state.target is not None else None)
    return jax.grad(lambda a: parts.method.loss(Views((a, v.proj[1]), v.pred, v.target), state.objective_state)[0])(z1)

  out["objective fwd+bwd"] = mean_seconds(jit(loss), (z1, z2), steps)
  grads = jax.tree.map(jnp.ones_like, state.params)

  def update(params, opt_state, grads):
    updates, opt_state = parts.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  out["optimizer update"] = mean_seconds(jit(update), (state.params, state.opt_state, grads), steps)
  if state.target is not None:
    online_vars = {"params": state.params["encoder"], "batch_stats": state.batch_stats["encoder"]}
    out["EMA target update"] = mean_seconds(jit(ema_update), (state.target, online_vars, jnp.float32(0.99)), steps)
  feats = jit(lambda p, x: _apply(parts.encoder, p, enc_stats, x)[0][0])(enc_params, x1)

  def probe(params, opt_state, feats, labels):
    def f(p):
      logits = nn.Dense(parts.num_classes).apply({"params": p}, feats)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    g = jax.grad(f)(params)
    updates, opt_state = parts.probe_tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  out["online probe"] = mean_seconds(jit(probe), (state.probe_params, state.probe_opt_state, feats, batch["labels"]), steps)

  def metrics(grads, params, z):
    return (optax.tree.norm(grads), optax.tree.norm(params), O.embedding_std(z), O.renyi2_rank(z))

  out["per-step metrics (norms, std, rank)"] = mean_seconds(jit(metrics), (grads, state.params, z1), steps)
  ok = jnp.bool_(True)
  out["non-finite guard (select over the state)"] = mean_seconds(
      jit(lambda ok, a, b: jax.tree.map(lambda x, y: jnp.where(ok, x, y), a, b)), (ok, state, state), steps)
  step_outputs = {k: jnp.float32(1.0) for k in ("loss", "lr", "finite", "grad_norm", "param_norm")}
  empty = step_metrics.empty({k: jax.ShapeDtypeStruct((), jnp.float32) for k in step_outputs})
  out["interval metrics (clu merge)"] = mean_seconds(jit(step_metrics.merge), (empty, step_outputs), steps)
  return out


def _with(config, **model):
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for k, v in model.items():
      config.model[k] = v
  return config


def random_dataset(config, n: int) -> ImageDataset:
  rng = np.random.default_rng(0)
  size = config.data.image_size
  return ImageDataset(rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8),
                      rng.integers(0, config.data.num_classes, n).astype(np.int32),
                      tuple(str(i) for i in range(config.data.num_classes)))


def whole_steps(path: str, variant: str, batches: list[int], mesh, steps: int, done=None) -> dict[int, dict[str, float]]:
  """Seconds a step of the loop's program, with a forward per view and with the views
  fused, batch by batch in the order given: a batch's two programs compiled at once in
  threads (compiling releases the GIL; on a many-core host the compiles overlap), then
  each timed alone. ``done(batch, rows)`` is called as each batch is timed, so a caller
  with a time limit keeps the batches that finished (on an H200 the four programs of
  batch 256 and 512 together did not finish in 100 s, 2026-12-04)."""
  rows = {}
  for batch in batches:
    config = load_config_file(path, variant or None)
    with config.unlocked():
      config.train.batch_size = batch
    dataset = random_dataset(config, max(4 * batch, 1024))
    jobs = {"whole step (the loop's program)": config, "whole step, views fused": _with(config, fused_views=True)}
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
      compiled = {name: pool.submit(compiled_full_step, c, dataset, mesh) for name, c in jobs.items()}
      compiled = {name: future.result() for name, future in compiled.items()}
    print(f"batch {batch}: {len(jobs)} programs compiled in {time.perf_counter() - t0:.1f}s", flush=True)
    rows[batch] = {name: full_step_seconds(c, dataset, mesh, steps, compiled[name]) for name, c in jobs.items()}
    del compiled
    if done is not None:
      done(batch, rows[batch])
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/cifar10.py", help="config file[:variant]")
  parser.add_argument("--batch", type=int, nargs="+", default=[256])
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--parts", choices=("all", "whole"), default="all",
                      help="whole: only the loop's program, per view and fused (compiled at once; for a short lease)")
  parser.add_argument("--out", default="", help="directory for breakdown.md and breakdown.json")
  args = parser.parse_args()
  if args.steps <= 0 or min(args.batch) <= 0:
    raise SystemExit("--steps and --batch must be positive.")
  path, _, variant = args.config.partition(":")
  if load_config_file(path, variant or None).data.source in VECTOR_SOURCES:
    raise SystemExit(f"{args.config}: the breakdown times the image step's parts (augmentation, ResNet); the "
                     "Gaussian mixture's vector step has none of them.")
  mesh = sharding.make_mesh()
  device = f"{jax.devices()[0].device_kind} x{jax.device_count()}"
  print(f"device: {device}, jax {jax.__version__}", flush=True)
  report, lines = {"device": device, "config": args.config, "rows": {}, "pairs_per_s": {}}, []

  def add(batch: int, rows: dict[str, float], method: str, model: str) -> None:
    """One batch's table into the report, written at once (a later batch may not finish)."""
    whole = rows["whole step (the loop's program)"]
    report["rows"][batch] = {k: v * 1e3 for k, v in rows.items()}
    report["pairs_per_s"][batch] = {"per_view": batch / whole, "fused": batch / rows["whole step, views fused"]}
    lines.extend([f"\n{method}, {model}, batch {batch} on {device}\n",
                  "| component | ms | share of the whole step |", "|---|---|---|"])
    lines.extend(f"| {name} | {s * 1e3:.3f} | {s / whole:.2f} |" for name, s in rows.items())
    lines.append(f"\npairs/s of one process: {batch / whole:.0f} with a forward per view, "
                 f"{batch / rows['whole step, views fused']:.0f} with the views fused")
    print("\n".join(lines[-len(rows) - 4:]), flush=True)
    if args.out:
      os.makedirs(args.out, exist_ok=True)
      with open(os.path.join(args.out, "breakdown.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
      with open(os.path.join(args.out, "breakdown.json"), "w") as f:
        json.dump(report, f, indent=2)

  config = load_config_file(path, variant or None)
  names = (config.method.name, f"{config.model.backbone} {config.model.dtype}")
  if args.parts == "whole":
    whole_steps(path, variant, args.batch, mesh, args.steps, done=lambda batch, rows: add(batch, rows, *names))
    return
  for batch in args.batch:
    config = load_config_file(path, variant or None)
    with config.unlocked():
      config.train.batch_size = batch
    dataset = random_dataset(config, max(4 * batch, 1024))
    rows = component_seconds(config, dataset, mesh, args.steps)
    rows["whole step (the loop's program)"] = full_step_seconds(config, dataset, mesh, args.steps)
    rows["whole step, views fused"] = full_step_seconds(_with(config, fused_views=True), dataset, mesh, args.steps)
    add(batch, rows, *names)


if __name__ == "__main__":
  main()
