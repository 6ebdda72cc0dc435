"""emim's programs, lowered as a run builds them, from abstract inputs (no data is read),
on a mesh made like ``sharding.make_mesh`` from a target's devices:

  * ``train``: the train step as ``train.lower_train_step`` builds it for the config's
    data path (``pipeline.DataShapes``: the batch gathered on the device from the
    replicated training set, or the host's two crops streamed in), with the interval
    metrics folded in;
  * ``mi``: the MI tracker (``mi_tracker.make_mi_tracker``) on its fixed batch;
  * ``features``: the evaluation program's feature extraction (``Backbone.apply``) on a
    batch of ``eval.batch_size`` centre images;
  * ``probe``: the linear probe's training (``linear_probe.probe_step_fn``): an epoch
    (a scan over its steps) on a device-held set, or a step on streamed crops;
  * ``model`` (not by default): benchmarks/train_step.py's ``model`` row, the network's
    own forward and backward for two views (ResNet + 2048-2048-2048 projector, Barlow
    Twins, SGD), at the config's batch and dtype.

``flops_breakdown`` counts the train step's FLOPs piece by piece.
"""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import numpy as np

from emim import sharding, train
from emim.backbone import backbone_from_model_config, model_config_of
from emim.config_base import VECTOR_SOURCES, ConfigError
from emim.data.pipeline import DataShapes
from emim.data.sources import input_shape
from emim.evaluators import linear_probe
from emim.evaluators import mi_tracker

# Training-set sizes: a device-resident set is an input of the step (its whole size on
# every chip); for a streamed one it sets only the schedule's constants.
TRAIN_EXAMPLES = {"cifar10": 50_000, "cifar100": 50_000, "imagenet2012": 1_281_167, "imagenet100": 126_689,
                  "imagenette/320px-v2": 9_469}

PROGRAMS = ("train", "mi", "features", "probe")


def _abstract(tree, spec):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=spec), tree)


def with_batch(config, batch: int | None):
  config = config.copy_and_resolve_references()
  if batch:
    with config.unlocked():
      config.train.batch_size = batch
  return config


def num_train_examples(config) -> int:
  name = config.data.class_subset or config.data.tfds_name or config.data.source
  return TRAIN_EXAMPLES.get(name, config.data.num_train)


def known_train_examples(config) -> int | None:
  """The training set's size where it is known here: a generated set's (data.num_train) or
  a named data set's; None for an image folder or a TFDS set of another name (the run
  counts it; ``num_train_examples``' data.num_train is then a stand-in)."""
  name = config.data.class_subset or config.data.tfds_name or config.data.source
  if name in TRAIN_EXAMPLES:
    return TRAIN_EXAMPLES[name]
  return config.data.num_train if config.data.source in ("synthetic", *VECTOR_SOURCES) else None


def lower_programs(config, mesh, programs=PROGRAMS) -> dict[str, tuple]:
  """{program: (lowered, images per call)} for the config on ``mesh``."""
  n_train = num_train_examples(config)
  batch = config.train.batch_size
  sharding.check_batch_size(batch, mesh)
  steps_per_epoch = max(n_train // batch, 1)
  total = config.train.num_steps or config.train.num_epochs * steps_per_epoch
  parts = train.build_parts(config, config.data.num_classes, steps_per_epoch, total)
  # The state laid out as the run will lay it out (config.sharding: replicated, fsdp or auto).
  state, state_sharding = train.state_shapes(parts, mesh, config.get("sharding"))
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sharding)
  replicated, batch_spec = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  vectors = config.data.source in VECTOR_SOURCES
  key, dtype = ("vectors", np.float32) if vectors else ("images", np.uint8)
  out = {}
  if "train" in programs:
    lowered, _ = train.lower_train_step(parts, DataShapes(config, mesh, n_train), state, state_sharding, mesh)
    out["train"] = (lowered, batch)
  if "mi" in programs and not not_built(config, "mi"):
    n, spec = mi_tracker.batch_layout(n_train, config.eval.mi_batch_size, mesh)
    inputs = {key: jax.ShapeDtypeStruct((n,) + input_shape(config.data), dtype, sharding=spec)}
    out["mi"] = (mi_tracker.make_mi_tracker(parts, objective_eps=config.method.get("eps", 1e-4)).lower(state, inputs), n)
  backbone = backbone_from_model_config(model_config_of(config), {})
  shape = input_shape(config.data)
  variables = _abstract(jax.eval_shape(lambda: backbone.model.init(jax.random.PRNGKey(0), np.zeros((1,) + shape,
                                                                                                     np.float32),
                                                                   train=False)), replicated)
  if "features" in programs:
    devices = mesh.devices.size
    n = max(devices, config.eval.batch_size - config.eval.batch_size % devices)  # as backbone.extract_features
    centre = shape if vectors else ((config.data.decode_size or config.data.image_size),) * 2 + (3,)
    images = jax.ShapeDtypeStruct((n,) + centre, dtype, sharding=batch_spec)
    out["features"] = (jax.jit(backbone.apply).lower(variables, images), n)
  if "probe" in programs and not not_built(config, "probe"):
    n = linear_probe.probe_batch_size(config.eval, n_train, mesh)
    tx = linear_probe.probe_optimizer(config.eval, n, config.eval.probe_epochs * (n_train // n))
    probe_state = _abstract(jax.eval_shape(lambda: linear_probe.init_probe_state(
        backbone, config.data.num_classes, tx, config.seed)), replicated)
    step = linear_probe.probe_step_fn(backbone, tx, "augmented", precropped=config.data.stream)
    if config.data.stream:  # a step on a batch of the host's crops
      data = {"inputs": jax.ShapeDtypeStruct((n,) + shape, np.uint8, sharding=batch_spec),
              "labels": jax.ShapeDtypeStruct((n,), np.int32, sharding=batch_spec)}
      out["probe"] = (jax.jit(step, donate_argnums=0).lower(probe_state, data, variables), n)
    else:  # an epoch on the training set held on the devices; per step below
      data = {"inputs": jax.ShapeDtypeStruct((n_train, int(np.prod(shape))), np.uint8, sharding=replicated),
              "labels": jax.ShapeDtypeStruct((n_train,), np.int32, sharding=replicated)}
      epoch = linear_probe.probe_epoch_fn(step, n_train, n, batch_spec, shape)
      out["probe"] = (jax.jit(epoch, donate_argnums=0).lower(probe_state, data, variables), n * (n_train // n))
  if "model" in programs and not not_built(config, "model"):
    reference = _load_benchmark("train_step")
    step, init = reference.model_step(config, config.model.dtype)
    model_state = _abstract(jax.eval_shape(init, jax.random.PRNGKey(0)), replicated)
    x = jax.ShapeDtypeStruct((batch,) + shape, np.float32, sharding=batch_spec)
    out["model"] = (jax.jit(step, donate_argnums=0).lower(model_state, x, x), batch)
  return out


def not_built(config, program: str) -> str:
  """Why ``lower_programs`` builds no ``program`` for ``config`` ("" where it builds it): the run has none."""
  vectors = config.data.source in VECTOR_SOURCES
  if program == "mi" and config.eval.mi_every_steps == 0:
    return "the run tracks no MI (--config.eval.mi_every_steps=0)"
  if program == "probe" and (vectors or config.eval.probe_mode != "augmented"):
    return (f"--config.eval.probe_mode={config.eval.probe_mode!r}: the probe trains on extracted features (the "
            "features row's program), no step of its own")
  if program == "model" and vectors:
    return "the model row is an image network's (benchmarks/train_step.py): the Gaussian mixture's vectors have none"
  return ""


def _load_benchmark(name: str):
  """A module of the source checkout's benchmarks/ (the ``model`` row's network)."""
  path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
  if not path.is_file():
    raise ConfigError(f"the model row needs {path.name} of emim's source checkout (benchmarks/), not found at {path}.")
  spec = importlib.util.spec_from_file_location(f"emim_benchmark_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# ----------------------------------------------------------------------------------
# Where the step's FLOPs go.
# ----------------------------------------------------------------------------------
def flops_breakdown(config) -> dict[str, float]:
  """Global FLOPs per step of the train step and of its pieces, each lowered alone on the
  step's shapes for one CPU device (XLA's cost analysis of the program before
  partitioning and fusion, which only the CPU client gives; no compile): the
  ``model`` row (the network's forward and backward of two views), the online encoder's
  forward and backward of both views, the target's forwards, the predictor, the
  objective's forward and backward, the online probe, the two augmented views, the
  optimiser's update, and the whole step."""
  from emim.methods import Views
  from emim.train_step import _apply_views, make_views

  import jax.numpy as jnp

  mesh = sharding.make_mesh(jax.devices("cpu")[:1])
  n_train = num_train_examples(config)
  batch = config.train.batch_size
  parts = train.build_parts(config, config.data.num_classes, max(n_train // batch, 1), 1000)
  state, state_sharding = train.state_shapes(parts, mesh)
  state = _abstract(state, sharding.replicated(mesh))
  batch_spec = sharding.batch_sharding(mesh)
  shape = input_shape(config.data)
  flops = lambda fn, *args: float(jax.jit(fn).lower(*args).cost_analysis().get("flops", 0.0))
  x = jax.ShapeDtypeStruct((batch,) + shape, np.float32, sharding=batch_spec)
  out = {"whole step": float(train.lower_train_step(parts, DataShapes(config, mesh, n_train), state, state_sharding,
                                                    mesh)[0].cost_analysis().get("flops", 0.0))}
  reference = _load_benchmark("train_step")
  step, init = reference.model_step(config, config.model.dtype)
  out["model row (network fwd+bwd, two views)"] = flops(step, _abstract(jax.eval_shape(init, jax.random.PRNGKey(0)),
                                                                        sharding.replicated(mesh)), x, x)
  enc = lambda p, s, a, b: _apply_views(parts.encoder, parts.views_encoder, p, s, a, b)
  enc_stats = state.batch_stats["encoder"]
  out["online encoder fwd+bwd, two views"] = flops(
      lambda p, s, a, b: jax.grad(lambda q: sum(jnp.sum(o[1]) for o in enc(q, s, a, b)[0]))(p),
      state.params["encoder"], enc_stats, x, x)
  (o1, _), _ = jax.eval_shape(enc, state.params["encoder"], enc_stats, x, x)
  z = jax.ShapeDtypeStruct(o1[1].shape, o1[1].dtype, sharding=batch_spec)
  if state.target is not None:
    out["target forward, two views"] = flops(
        lambda t, a, b: _apply_views(parts.encoder, parts.views_encoder, t["params"], t["batch_stats"], a, b)[0],
        state.target, x, x)
  pred = None
  if parts.predictor is not None:
    out["predictor fwd+bwd, two views"] = flops(lambda p, s, a, b: jax.grad(lambda q: sum(
        jnp.sum(y) for y in _apply_views(parts.predictor, parts.views_predictor, q, s, a, b)[0]))(p),
        state.params["predictor"], state.batch_stats["predictor"], z, z)
    pred = (z, z)

  def objective(a, b, objective_state):
    views = lambda u: Views((u, b), None if pred is None else (u, b), None if state.target is None else (b, u))
    return jax.grad(lambda u: parts.method.loss(views(u), objective_state)[0])(a)

  out["objective fwd+bwd (float32, HIGHEST)"] = flops(objective, z, z, state.objective_state)
  f = jax.ShapeDtypeStruct(o1[0].shape, np.float32, sharding=batch_spec)
  labels = jax.ShapeDtypeStruct((batch,), np.int32, sharding=batch_spec)

  def probe(params, feats, labels):
    import flax.linen as nn
    import optax

    return jax.grad(lambda q: optax.softmax_cross_entropy_with_integer_labels(
        nn.Dense(parts.num_classes).apply({"params": q}, feats), labels).mean())(params)

  out["online probe fwd+bwd"] = flops(probe, state.probe_params, f, labels)
  if not config.data.stream and config.data.source not in VECTOR_SOURCES:
    images = {"images": jax.ShapeDtypeStruct((batch,) + shape, np.uint8, sharding=batch_spec)}
  else:
    images = {"views": jax.ShapeDtypeStruct((batch, 2) + shape, np.uint8, sharding=batch_spec)} \
        if config.data.stream else {"vectors": x}
  out["augmentation, two views"] = flops(lambda r, s, b: make_views(parts, r, s, b), state.rng, state.step, images)
  out["optimiser update"] = flops(lambda p, o, g: parts.tx.update(g, o, p), state.params, state.opt_state, state.params)
  return out
