"""Train-step throughput, side by side with ../shared/bench/torch_reference.py.

    python benchmarks/train_step.py --config=configs/cifar10.py --batch 256 512
    python benchmarks/train_step.py --config=configs/cifar10.py --batch 512 --emim_dtypes float32 bfloat16 --augment_row
    python benchmarks/train_step.py --config=configs/synthetic.py:runlocal --batch 32 --steps 3   # CPU smoke
    python benchmarks/train_step.py --config=configs/imagenet1k.py:byol --batch 128 256   # ResNet-50, 224, streamed

Two rows per batch size (more with the options below):
  * ``model``: what the PyTorch reference times, on the same footing: ResNet-18 (the
    config's backbone) + a 2048-2048-2048 projector, the two views concatenated into one
    forward, Barlow Twins, SGD with momentum, bf16 compute, inputs already on the device
    (no augmentation);
  * ``emim``: emim's real step for the config (method, EMA target, online probe, LARS),
    with the batch gathered and augmented on the device from a uint8 dataset held there;
    for a streamed config (ImageNet), from a batch of host-cropped views on the device.
  * ``augment`` (``--augment_row``): the step's batch gather and two augmented views alone,
    to see what the on-device augmentation costs inside the ``emim`` row.
``--emim_dtypes`` times the ``emim`` row once per compute dtype (default: the config's).
Prints ms/step and pairs/s (a pair = two views of one image), and the compile time.
Absolute figures count only from an accelerator; on a CPU compare rows of one run.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from emim import objectives as O
from emim import sharding, train
from emim.config_base import load_config_file
from emim.models import MLP, make_backbone, parse_dtype
from emim.train_step import device_data_step, gather_batch, init_state, make_views, train_step


def timed(step, state, args, steps: int, warmup: int = 5) -> tuple[float, float]:
  """(compile seconds, seconds per step) of a jitted step threading its state."""
  t0 = time.perf_counter()
  state, _ = step(state, *args)
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - t0
  for _ in range(warmup):
    state, _ = step(state, *args)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, _ = step(state, *args)
  jax.block_until_ready(state)
  return compile_s, (time.perf_counter() - t0) / steps


def model_step(config, dtype: str):
  """The PyTorch reference's step, in emim's modules: ``(step(state, x1, x2) -> (state,
  loss), init(key) -> state)``, neither jitted."""
  cdtype = parse_dtype(dtype)
  # A ViT's tokens are the config's patch grid (CIFAR's 4-pixel patches at 32x32: 64 of them); drop path is left
  # out (the reference network has none, and it would need an rng stream).
  backbone = make_backbone(config.model.backbone, config.model.width, config.model.cifar_stem, cdtype,
                           patch_size=config.model.get("patch_size", 16), image_size=config.data.image_size,
                           remat_policy=config.model.get("remat_policy", "nothing_saveable"))
  projector = MLP((2048, 2048, 2048), dtype=cdtype)
  size = config.data.image_size
  tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))

  def forward(variables, x):
    feats, bb_stats = backbone.apply(variables["backbone"], x, train=True, mutable=["batch_stats"])
    z, head_stats = projector.apply(variables["head"], feats, train=True, mutable=["batch_stats"])
    return z, (bb_stats, head_stats)

  def init(key):
    variables = {"backbone": backbone.init(key, jnp.zeros((2, size, size, 3)), train=False)}
    variables["head"] = projector.init(key, jnp.zeros((2, backbone.feature_dim)), train=False)
    params = jax.tree.map(lambda v: v["params"], variables, is_leaf=lambda v: "params" in v)
    # A ViT has no BatchNorm: its backbone has no batch statistics.
    stats = jax.tree.map(lambda v: v.get("batch_stats", {}), variables, is_leaf=lambda v: "params" in v)
    return (params, stats, tx.init(params))

  def step(state, x1, x2):
    params, stats, opt_state = state

    def loss_fn(params):
      v = {k: {"params": params[k], "batch_stats": stats[k]} for k in params}
      z, (bb, head) = forward(v, jnp.concatenate([x1, x2]))
      loss, _ = O.barlow_twins(*jnp.split(z, 2), lambd=0.0051)
      return loss, {"backbone": bb.get("batch_stats", {}), "head": head["batch_stats"]}

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), new_stats, opt_state), loss

  return step, init


def model_step_row(config, batch: int, steps: int, dtype: str, mesh) -> tuple[float, float]:
  """The PyTorch reference's step (``model_step``), timed."""
  step, init = model_step(config, dtype)
  key = jax.random.PRNGKey(0)
  size = config.data.image_size
  spec = sharding.batch_sharding(mesh)
  x1 = jax.device_put(jax.random.normal(key, (batch, size, size, 3)), spec)
  x2 = jax.device_put(jax.random.normal(jax.random.fold_in(key, 1), (batch, size, size, 3)), spec)
  return timed(jax.jit(step, donate_argnums=0), jax.jit(init)(key), (x1, x2), steps)


def _device_dataset(config, batch: int, mesh):
  """A random uint8 dataset of 4 batches (at least 1024 images), held on the devices."""
  n = max(4 * batch, 1024)
  size = config.data.image_size
  rng = np.random.default_rng(0)
  replicated = sharding.replicated(mesh)
  return {"images": sharding.put_global(rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8), replicated),
          "labels": sharding.put_global(rng.integers(0, config.data.num_classes, n).astype(np.int32), replicated)}


def streamed_step_row(config, batch: int, steps: int, mesh) -> tuple[float, float]:
  """emim's step as a streamed config (ImageNet) runs it: the host's two random resized
  crops arrive as a uint8 (B, 2, S, S, 3) batch, the rest of the augmentation on the
  device (the batch is already there: the host pipeline is benchmarks/input_pipeline.py)."""
  with config.unlocked():
    config.train.batch_size = batch
  parts = train.build_parts(config, config.data.num_classes, 1000, 10_000)
  state = jax.jit(functools.partial(init_state, parts))(jax.random.PRNGKey(0))
  size, rng = config.data.image_size, np.random.default_rng(0)
  spec = sharding.batch_sharding(mesh)
  inputs = {"views": jax.device_put(rng.integers(0, 255, (batch, 2, size, size, 3), dtype=np.uint8), spec),
            "labels": jax.device_put(rng.integers(0, config.data.num_classes, batch).astype(np.int32), spec)}
  return timed(jax.jit(functools.partial(train_step, parts=parts), donate_argnums=0), state, (inputs,), steps)


def emim_step_row(config, batch: int, steps: int, mesh, augment_only: bool = False) -> tuple[float, float]:
  """emim's own step for the config, data gathered and augmented on device; with
  ``augment_only``, the gather and the two views alone (the step's input stage)."""
  if config.data.stream and not augment_only:
    return streamed_step_row(config, batch, steps, mesh)
  with config.unlocked():
    config.train.batch_size = batch
  dataset = _device_dataset(config, batch, mesh)
  n = dataset["labels"].shape[0]
  parts = train.build_parts(config, config.data.num_classes, n // batch, 10_000)
  state = jax.jit(functools.partial(init_state, parts))(jax.random.PRNGKey(0))
  batch_sharding = sharding.batch_sharding(mesh)
  if augment_only:
    # The state threads only the step counter, so each call draws new views.
    def views_step(carry, dataset):
      rng, step = carry
      views = make_views(parts, rng, step, gather_batch(dataset, rng, step, batch, batch_sharding))
      return (rng, step + 1), views

    return timed(jax.jit(views_step, donate_argnums=0), (state.rng, state.step), (dataset,), steps)
  step = jax.jit(functools.partial(device_data_step, parts=parts, batch_size=batch,
                                   batch_sharding=batch_sharding), donate_argnums=0)
  return timed(step, state, (dataset,), steps)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/cifar10.py", help="config file[:variant]")
  parser.add_argument("--batch", type=int, nargs="+", default=[256, 512])
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--dtype", default="bfloat16", help="compute dtype of the model row")
  parser.add_argument("--emim_dtypes", nargs="+", default=None,
                      help="compute dtypes of the emim row, one row each (default: the config's model.dtype)")
  parser.add_argument("--augment_row", action="store_true", help="also time the gather + augmentation alone")
  parser.add_argument("--rows", nargs="+", choices=("model", "emim"), default=["model", "emim"],
                      help="which rows to time (emim alone: the config's own step, e.g. for a short lease)")
  args = parser.parse_args()
  path, _, variant = args.config.partition(":")
  mesh = sharding.make_mesh()
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}", flush=True)
  for batch in args.batch:
    config = load_config_file(path, variant or None)
    if "model" in args.rows:
      compile_s, dt = model_step_row(config, batch, args.steps, args.dtype, mesh)
      print(f"model[{config.model.backbone}, barlow_twins, {args.dtype}] batch={batch}: {dt * 1e3:.2f} ms/step, "
            f"{batch / dt:.0f} pairs/s (compile {compile_s:.1f}s)", flush=True)
    if args.augment_row:
      compile_s, dt = emim_step_row(config, batch, args.steps, mesh, augment_only=True)
      print(f"augment batch={batch}: {dt * 1e3:.2f} ms/step, {batch / dt:.0f} pairs/s (compile {compile_s:.1f}s)",
            flush=True)
    for dtype in (args.emim_dtypes or [config.model.dtype]) if "emim" in args.rows else []:
      with config.unlocked():
        config.model.dtype = dtype
      compile_s, dt = emim_step_row(config, batch, args.steps, mesh)
      print(f"emim[{config.method.name}, {dtype}] batch={batch}: {dt * 1e3:.2f} ms/step, {batch / dt:.0f} pairs/s "
            f"(compile {compile_s:.1f}s)", flush=True)


if __name__ == "__main__":
  main()
