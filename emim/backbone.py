"""A frozen backbone for evaluation and export: the model, its variables and its input
convention, restored from a training run's checkpoint without building the train state."""

from __future__ import annotations

import dataclasses
import json
import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from emim import checkpoint as ckpt_lib
from emim import compiled, fs, sharding
from emim.config_base import ConfigError
from emim.data import augment
from emim.data.sources import input_shape
from emim.models import ResNet, ViT, backbone_variables, make_backbone, parse_dtype, vit_options


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A trunk (a ResNet, a ViT, or the MLP for vectors) with its params and BatchNorm
  statistics (none for a ViT).

  Attributes:
    model: the Flax module (inference: ``train=False``).
    variables: {"params": ..., "batch_stats": ...}.
    image_size: the input size it was trained at.
    mean, std: the per-channel normalisation applied to [0, 1] images.
    model_config: the config fields that rebuild ``model``.
  """

  model: ResNet | ViT
  variables: dict
  image_size: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  model_config: dict

  @property
  def feature_dim(self) -> int:
    return self.model.feature_dim

  @property
  def input_shape(self) -> tuple[int, ...]:
    """One example: (image_size, image_size, 3), or (dim,) for vectors."""
    return input_shape_of(self.model_config)

  def preprocess(self, images: jax.Array) -> jax.Array:
    """uint8 or [0, 1] images of any square size -> normalised float32 at image_size
    (a centre crop, resized, when the stored images are larger); vectors as they are."""
    if len(self.input_shape) == 1:
      return images.astype(jnp.float32)
    if images.dtype == jnp.uint8:
      images = augment.to_float(images)
    if images.shape[1] != self.image_size:
      fraction = self.image_size / images.shape[1] if images.shape[1] > self.image_size else 1.0
      images = jax.vmap(lambda x: augment.center_crop(x, self.image_size, fraction))(images)
    return augment.normalize(images, self.mean, self.std)

  def apply(self, variables: dict, images: jax.Array) -> jax.Array:
    """Features (N, feature_dim) of raw images; pure, for jit."""
    return self.model.apply(variables, self.preprocess(images), train=False)

  def jitted_apply(self):
    """``apply`` jitted, the variables an argument (not constants of the program): one
    function per model config in this process, so that every backbone of that model
    (each checkpoint of a run, each evaluation) reuses its compiled programs."""
    # The function holds a variable-free copy of this backbone: a cached program must not
    # keep the first backbone's parameters alive.
    model_only = dataclasses.replace(self, variables={})
    return compiled.once("backbone_apply", compiled.key_of(self.model_config),
                         lambda: jax.jit(lambda variables, images: model_only.apply(variables, images)))

  def features_fn(self):
    """A jitted fn(images) -> features with the variables bound: copied once to every
    device of a mesh the images are sharded over (replicated), else used as they are."""
    apply, placed = self.jitted_apply(), {}

    def features(images):
      where = getattr(images, "sharding", None)
      if not isinstance(where, jax.sharding.NamedSharding):
        return apply(self.variables, images)
      if where.mesh not in placed:
        placed[where.mesh] = jax.device_put(self.variables, sharding.replicated(where.mesh))
      return apply(placed[where.mesh], images)

    return features


def model_config_of(config: ml_collections.ConfigDict) -> dict:
  m, d = config.model, config.data
  vit_fields = {k: m[k] for k in ("patch_size", "drop_path", "remat_policy") if k in m}
  return {"backbone": m.backbone, "width": m.width, "cifar_stem": m.cifar_stem, "dtype": m.dtype, **vit_fields,
          "image_size": d.image_size, "mean": list(d.mean), "std": list(d.std),
          "input_shape": list(input_shape(d))}


def input_shape_of(model_config: dict) -> tuple[int, ...]:
  """The input shape a model config records (images of image_size before it did)."""
  size = model_config["image_size"]
  return tuple(model_config.get("input_shape", (size, size, 3)))


def backbone_from_model_config(mc: dict, variables: dict) -> Backbone:
  model = make_backbone(mc["backbone"], mc["width"], mc["cifar_stem"], parse_dtype(mc["dtype"]),
                        **vit_options(mc, mc["image_size"]))
  return Backbone(model, variables, mc["image_size"], tuple(mc["mean"]), tuple(mc["std"]), dict(mc))


def init_backbone(model_config: dict, seed: int = 0) -> Backbone:
  """A randomly initialised backbone (a baseline for the probes, and for tests)."""
  skeleton = backbone_from_model_config(model_config, {})
  variables = skeleton.model.init(jax.random.PRNGKey(seed), jnp.zeros((1,) + input_shape_of(model_config)), train=False)
  return backbone_from_model_config(model_config, variables)


def checkpoint_dir(workdir: fs.PathLike) -> fs.Path:
  return fs.as_path(workdir) / "checkpoints"


def load_run_config(workdir: fs.PathLike, step: int | None = None) -> ml_collections.ConfigDict:
  """The config a training run trained with when it saved checkpoint ``step`` (the latest
  by default), as that checkpoint recorded it; the run's config.json for a run without
  checkpoints or with checkpoints from before they held their config."""
  workdir = fs.as_path(workdir)
  if step is not None or ckpt_lib.latest_step(checkpoint_dir(workdir)) is not None:
    _, saved = ckpt_lib.restore_config(checkpoint_dir(workdir), step)
    if saved is not None:
      return ml_collections.ConfigDict(_tuples(saved))
  path = workdir / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"No {path} and no checkpoint: --workdir must be a training run's work directory.")
  return ml_collections.ConfigDict(_tuples(json.loads(path.read_text())))


def _tuples(value):
  """JSON's lists back to the tuples the configs hold (so --config.x='(1, 2)' applies)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


# The model fields that decide the shapes of the saved variables.
_SHAPE_FIELDS = ("backbone", "width", "cifar_stem", "patch_size")


def latest_run_config(workdir: fs.PathLike, tries: int = 3) -> tuple[int | None, ml_collections.ConfigDict]:
  """(the latest step, the config saved with it): read again when the run still training
  deletes that step (``checkpoint.keep``) before its config is read."""
  directory = checkpoint_dir(workdir)
  for attempt in range(tries):
    step = ckpt_lib.latest_step(directory)
    try:
      return step, load_run_config(workdir, step)
    except ckpt_lib.CheckpointError:
      if step is None or attempt == tries - 1 or not ckpt_lib.deleted_soon(directory / str(step)):
        raise


def check_same_model(workdir: fs.PathLike, config: ml_collections.ConfigDict, step: int | None = None) -> None:
  """Refuse a config whose model is not the one checkpoint ``step`` of the run in
  ``workdir`` holds (a config file given without the run's overrides), before any
  restore."""
  try:
    saved = load_run_config(workdir, step).model
  except FileNotFoundError:
    return
  differ = [f"{k}={saved.get(k)!r} in the run, {config.model.get(k)!r} asked" for k in _SHAPE_FIELDS
            if k in saved and saved.get(k) != config.model.get(k)]
  if differ:
    raise ConfigError(
        f"The run in {workdir} trained another model than this config describes ({'; '.join(differ)}). "
        "Leave out --config to use the run's own config (its fields can still be overridden, e.g. "
        "--config.eval.probe_epochs=10), or repeat the training run's --config.model overrides.")


def restore_backbone(workdir: fs.PathLike, config: ml_collections.ConfigDict, step: int | None = None,
                     newest_if_deleted: bool | None = None, tries: int = 3) -> tuple[int, Backbone]:
  """Only the online backbone's params and batch statistics, from the latest or a given
  step; safe while training is still writing newer checkpoints, and deleting older ones
  (``checkpoint.keep``): with ``newest_if_deleted`` (the default when ``step`` is None:
  the latest was asked for, perhaps fixed earlier by the caller) a step deleted before it
  was read gives way to the newest one then."""
  if newest_if_deleted is None:
    newest_if_deleted = step is None
  directory = checkpoint_dir(workdir)
  for attempt in range(tries):
    if step is None:  # fixed now: a newer checkpoint may land while this one is read
      step = ckpt_lib.latest_step(directory)
    try:
      check_same_model(workdir, config, step)
      step, tree = ckpt_lib.restore_subtree(directory, step, ("params", "batch_stats"))
      break
    except ckpt_lib.CheckpointError:
      if not newest_if_deleted or step is None or attempt == tries - 1:
        raise
      if not ckpt_lib.deleted_soon(directory / str(step)):  # still there: it cannot be read
        raise
      logging.info("The checkpoint of step %d was deleted by the run still training; reading the newest one.", step)
      step = None
  variables = backbone_variables(tree["params"]["encoder"], tree.get("batch_stats", {}).get("encoder", {}))
  return step, backbone_from_model_config(model_config_of(config), variables)


def extract_features(fn, images: np.ndarray, batch_size: int, mesh=None) -> np.ndarray:
  """Features of every image, in order, with batches sharded over the mesh's devices.

  The last batch is padded to full size (and the padding dropped) so one compiled
  program serves every batch.
  """
  mesh = mesh or sharding.make_mesh()
  devices = mesh.devices.size
  batch_size = max(devices, batch_size - batch_size % devices)
  spec = sharding.batch_sharding(mesh)
  out = []
  for start in range(0, len(images), batch_size):
    chunk = images[start : start + batch_size]
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], chunk.dtype)])
    out.append(np.asarray(jax.device_get(fn(jax.device_put(chunk, spec))))[:n])
  return np.concatenate(out)


def features_and_labels(fn, data, batch_size: int, mesh=None, workers: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Features of every example of an in-memory ``ImageDataset`` or a ``StreamSplit``
  (decoded batch by batch on the host), with their labels, in order."""
  if hasattr(data, "inputs"):
    return extract_features(fn, data.inputs, batch_size, mesh), np.asarray(data.labels)
  features, labels = [], []
  for batch in data.ordered_batches(batch_size, workers):
    features.append(extract_features(fn, batch["images"], batch_size, mesh))
    labels.append(batch["labels"])
  return np.concatenate(features), np.concatenate(labels)
