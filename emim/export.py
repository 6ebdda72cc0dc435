"""Export a trained backbone for downstream jobs: JAX, and PyTorch (torchvision's ResNets, timm's ViTs).

    python -m emim.export --workdir=runs/cifar10 --output=exports/cifar10 [--checkpoint_step=N] [--overwrite]

writes to --output (a new or empty directory, or any with --overwrite; local or gs://):
  backbone.msgpack                   params and BatchNorm statistics (flax.serialization)
  model.json                         what rebuilds the model: architecture, width, stem,
                                     input size and normalisation, step, method
  torchvision_resnet.safetensors     (ResNets) a torchvision ResNet state dict (no ``fc``); for the
                                     CIFAR stem replace ``conv1`` by a 3x3 stride-1 conv and
                                     ``maxpool`` by ``nn.Identity()`` before loading
  timm_vit.safetensors               (ViTs) a timm VisionTransformer state dict (no head) that
                                     ``timm.create_model(name, num_classes=0)`` loads with
                                     strict=True; model.json's ``timm`` names the model, or for
                                     sizes timm has no name for gives VisionTransformer's keywords

The model is the one the checkpoint holds (its own saved config). The directory appears
complete or not at all: locally the files are written to a temporary sibling that is then
renamed; on an object store ``model.json``, which ``load_backbone`` looks for first, is
written last.

A downstream job needs one call:
    model, features = emim.load_backbone("exports/cifar10")
    feats = features(images)   # uint8 or [0, 1] float, (N, H, W, 3) -> (N, D)
"""

from __future__ import annotations

import json
import os
import shutil
import uuid

import flax.serialization
import jax
import numpy as np
from absl import app, flags, logging

from emim import cli, fs
from emim import checkpoint as ckpt_lib
from emim.backbone import (Backbone, backbone_from_model_config, checkpoint_dir, input_shape_of, load_run_config,
                           restore_backbone)
from emim.models import DTYPES, ResNet, ViT
from emim.checkpoint import quiet_orbax_logs
from emim.errors import UserError

BACKBONE_FILE, MODEL_FILE, TORCH_FILE = "backbone.msgpack", "model.json", "torchvision_resnet.safetensors"
TIMM_FILE = "timm_vit.safetensors"
EXPORT_FILES = (BACKBONE_FILE, MODEL_FILE, TORCH_FILE, TIMM_FILE)

# emim's published ViT sizes -> timm's size names; timm registers vit_{size}_patch{p}_{resolution}
# with these sizes only for the (patch, resolution) pairs below (timm 1.0).
_TIMM_VIT_SIZES = {"vit_ti16": "tiny", "vit_s16": "small", "vit_b16": "base", "vit_l16": "large"}
_TIMM_VIT_NAMES = frozenset({
    "vit_tiny_patch16_224", "vit_tiny_patch16_384",
    "vit_small_patch8_224", "vit_small_patch16_224", "vit_small_patch16_384", "vit_small_patch32_224",
    "vit_small_patch32_384",
    "vit_base_patch8_224", "vit_base_patch16_224", "vit_base_patch16_384", "vit_base_patch32_224",
    "vit_base_patch32_384",
    "vit_large_patch14_224", "vit_large_patch16_224", "vit_large_patch16_384", "vit_large_patch32_224",
    "vit_large_patch32_384",
})


def torchvision_state_dict(backbone: Backbone) -> dict[str, np.ndarray]:
  """The backbone's variables under torchvision's ResNet names and layouts.

  conv kernels (kh, kw, in, out) -> (out, in, kh, kw); BatchNorm scale/bias/mean/var ->
  weight/bias/running_mean/running_var (+ num_batches_tracked); stage i block j ->
  layer{i}.{j-1}; the projection shortcut -> downsample.0 (conv) and downsample.1 (BN).
  """
  params = jax.device_get(backbone.variables["params"])
  stats = jax.device_get(backbone.variables["batch_stats"])
  out: dict[str, np.ndarray] = {}

  def conv(torch_name, p):
    out[f"{torch_name}.weight"] = np.ascontiguousarray(np.transpose(np.asarray(p["kernel"], np.float32), (3, 2, 0, 1)))

  def bn(torch_name, p, s):
    out[f"{torch_name}.weight"] = np.asarray(p["scale"], np.float32)
    out[f"{torch_name}.bias"] = np.asarray(p["bias"], np.float32)
    out[f"{torch_name}.running_mean"] = np.asarray(s["mean"], np.float32)
    out[f"{torch_name}.running_var"] = np.asarray(s["var"], np.float32)
    out[f"{torch_name}.num_batches_tracked"] = np.zeros((), np.int64)

  conv("conv1", params["stem_conv"])
  bn("bn1", params["stem_bn"], stats["stem_bn"])
  for name, block in params.items():
    if not name.startswith("stage"):
      continue
    stage, blk = name.removeprefix("stage").split("_block")
    prefix = f"layer{int(stage)}.{int(blk) - 1}"
    for layer in block:
      if layer.startswith("conv"):
        conv(f"{prefix}.{layer}", block[layer])
      elif layer.startswith("bn"):
        bn(f"{prefix}.{layer}", block[layer], stats[name][layer])
    if "downsample_conv" in block:
      conv(f"{prefix}.downsample.0", block["downsample_conv"])
      bn(f"{prefix}.downsample.1", block["downsample_bn"], stats[name]["downsample_bn"])
  return out


def timm_vit_model(backbone: Backbone) -> dict:
  """How timm builds the same ViT: ``{"model": name, "kwargs": keywords}``.

  ``model`` is timm's registered name (``timm.create_model(model, num_classes=0)``), or None
  for a size or resolution timm has no name for; ``kwargs`` are always
  ``timm.models.VisionTransformer``'s keywords for it. timm's defaults are emim's model:
  pre-LayerNorm blocks with eps 1e-6, exact GELU, qkv and projection biases, and with
  ``global_pool="token"`` the final ``norm`` (not ``fc_norm``) then the class token, which
  with ``num_classes=0`` is ``model(x)``: emim's feature.
  """
  m = backbone.model
  kwargs = dict(img_size=m.image_size, patch_size=m.patch_size, embed_dim=m.width, depth=m.depth, num_heads=m.heads,
                mlp_ratio=float(m.mlp_ratio), num_classes=0, global_pool="token", class_token=True)
  size = _TIMM_VIT_SIZES.get(backbone.model_config.get("backbone"))
  name = f"vit_{size}_patch{m.patch_size}_{m.image_size}"
  return {"model": name if name in _TIMM_VIT_NAMES else None, "kwargs": kwargs}


def timm_state_dict(backbone: Backbone) -> dict[str, np.ndarray]:
  """The ViT's params under timm's VisionTransformer names and layouts.

  patch_embed kernel (kh, kw, in, out) -> patch_embed.proj.weight (out, in, kh, kw); the
  (1, h, w, D) position embeddings -> pos_embed (1, 1 + h*w, D) in row-major patch order
  (timm's flatten of the conv output), with a zero row for the class token, whose own
  parameter in emim carries its position; the blocks, stacked by ``nn.scan`` along a
  leading axis, -> blocks.{i}; qkv's (D, 3, heads, head_dim) kernel -> attn.qkv.weight
  (3*D, D), which timm splits as (3, heads, head_dim) too; proj's (heads, head_dim, D)
  -> attn.proj.weight (D, D); Dense kernels transposed to Linear's (out, in); LayerNorm
  scale -> weight.
  """
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(backbone.variables["params"]))
  width = backbone.model.width
  out: dict[str, np.ndarray] = {}

  def linear(torch_name, kernel, bias):  # kernel (in..., out...) flattened to (in, out), then Linear's (out, in)
    fan_in = int(np.prod(kernel.shape)) // bias.size
    out[f"{torch_name}.weight"] = np.ascontiguousarray(kernel.reshape(fan_in, bias.size).T)
    out[f"{torch_name}.bias"] = bias.reshape(-1)

  def norm(torch_name, p):
    out[f"{torch_name}.weight"], out[f"{torch_name}.bias"] = p["scale"], p["bias"]

  out["cls_token"] = params["cls_token"]
  posemb = params["pos_embedding"].reshape(1, -1, width)
  out["pos_embed"] = np.concatenate([np.zeros((1, 1, width), np.float32), posemb], axis=1)
  out["patch_embed.proj.weight"] = np.ascontiguousarray(np.transpose(params["patch_embed"]["kernel"], (3, 2, 0, 1)))
  out["patch_embed.proj.bias"] = params["patch_embed"]["bias"]
  blocks = params["blocks"]
  for i in range(backbone.model.depth):
    block = jax.tree.map(lambda x: x[i], blocks)
    prefix = f"blocks.{i}"
    norm(f"{prefix}.norm1", block["norm1"])
    linear(f"{prefix}.attn.qkv", block["attn"]["qkv"]["kernel"], block["attn"]["qkv"]["bias"])
    linear(f"{prefix}.attn.proj", block["attn"]["proj"]["kernel"], block["attn"]["proj"]["bias"])
    norm(f"{prefix}.norm2", block["norm2"])
    linear(f"{prefix}.mlp.fc1", block["fc1"]["kernel"], block["fc1"]["bias"])
    linear(f"{prefix}.mlp.fc2", block["fc2"]["kernel"], block["fc2"]["bias"])
  norm("norm", params["norm"])
  return out


class ExportError(UserError, RuntimeError):
  """An export that cannot be written or read; the message names the path and the fix."""


class ExportNotFound(ExportError, FileNotFoundError):
  """No export at the path given (a FileNotFoundError too, as it was before it was an ExportError)."""


class ExportDtypeError(ExportError, ValueError):
  """A ``load_backbone(dtype=...)`` that names no dtype a backbone computes in (a ValueError too, as it was)."""


def _write_files(backbone: Backbone, directory: fs.Path, meta: dict) -> None:
  from safetensors.numpy import save as safetensors_bytes

  variables = jax.device_get(backbone.variables)
  fs.atomic_write_bytes(directory / BACKBONE_FILE, flax.serialization.to_bytes(variables))
  if isinstance(backbone.model, ResNet):  # torchvision has no layout for the vectors' MLP
    fs.atomic_write_bytes(directory / TORCH_FILE, safetensors_bytes(torchvision_state_dict(backbone)))
  if isinstance(backbone.model, ViT):
    fs.atomic_write_bytes(directory / TIMM_FILE, safetensors_bytes(timm_state_dict(backbone)))
  fs.atomic_write_text(directory / MODEL_FILE, json.dumps(meta, indent=2))  # last: marks the export complete


def check_output(output: fs.PathLike, overwrite: bool, workdir: fs.PathLike | None = None) -> fs.Path:
  """``output`` as a path (a symlink's target), if an export may be written there: a new
  or empty directory, or with ``overwrite`` one that holds an earlier export and nothing
  else. Never the run's own work directory, nor any folder with other files: --overwrite
  replaces an export, not a project."""
  output = fs.as_path(output)
  if not fs.is_remote(output):
    output = fs.as_path(os.path.realpath(os.fspath(output)))
  if output.exists() and not output.is_dir():
    raise ExportError(f"--output {output} is a file, not a directory.")
  if workdir is not None and os.fspath(output).rstrip("/") == os.fspath(fs.as_path(workdir)).rstrip("/"):
    raise ExportError(f"--output {output} is the run's work directory: choose a directory of its own.")
  names = sorted(p.name for p in output.iterdir()) if output.is_dir() else []
  foreign = [n for n in names if n not in EXPORT_FILES]
  if foreign:  # --overwrite would be refused too: suggest what works
    inside = output / "emim_export"
    suggestion = (f"--output={inside} (a new folder inside it)" if not inside.exists() else
                  "a new or empty directory")
    raise ExportError(f"--output {output} holds files that are not an emim export ({foreign[:5]}); an export is "
                      f"written only to a new or empty directory, or over an earlier export. Choose {suggestion}.")
  if names and not overwrite:
    raise ExportError(f"--output {output} holds an earlier export ({names}). Add --overwrite to replace it, or "
                      "choose a new directory.")
  return output


def export_backbone(backbone: Backbone, output: fs.PathLike, info: dict | None = None, overwrite: bool = False) -> fs.Path:
  """Write the export files to ``output``; returns the directory.

  ``output`` must be new or empty, or with ``overwrite`` hold an earlier export (and
  nothing else): another run's files are never replaced by accident.
  """
  output = check_output(output, overwrite)
  meta = {**backbone.model_config, "feature_dim": backbone.feature_dim, **(info or {})}
  if isinstance(backbone.model, ViT):
    meta["timm"] = timm_vit_model(backbone)
  if fs.is_remote(output):
    # model.json first (incomplete until the new one lands), then the earlier export's other files: a ResNet's
    # torchvision file must not stay beside a ViT's export, nor a ViT's timm file beside a ResNet's.
    for name in (MODEL_FILE,) + tuple(n for n in EXPORT_FILES if n != MODEL_FILE):
      if (output / name).exists():
        (output / name).unlink()
    output.mkdir(parents=True, exist_ok=True)
    _write_files(backbone, output, meta)
    return output
  output.parent.mkdir(parents=True, exist_ok=True)
  staging = output.parent / f".{output.name}.tmp-{uuid.uuid4().hex[:8]}"
  staging.mkdir()
  try:
    _write_files(backbone, staging, meta)
    replaced = None
    if output.exists():
      replaced = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
      os.replace(output, replaced)
    try:
      os.replace(staging, output)
    except OSError:
      if replaced is not None:
        os.replace(replaced, output)  # the earlier export stays where it was
      raise
    if replaced is not None:
      shutil.rmtree(replaced)
  finally:
    if staging.exists():
      shutil.rmtree(staging)
  return output


def load_backbone(path: fs.PathLike, dtype: str | None = None):
  """Load an exported backbone: returns (Backbone, jitted features(images) -> (N, D)).

  Images are (N, H, W, 3), uint8 or float in [0, 1] (floats outside it, e.g. 0-255, are
  refused: ``ExportError``); they are centre-cropped to the training size when larger
  (said once) and normalised as in training. ``dtype``: the dtype the backbone computes
  in, where not the one it trained in (``model.json``'s): "float32" for the features of
  a backbone trained in bfloat16 without its rounding, as PyTorch's copy computes them
  (the parameters are float32 either way); jnp.float32 and the like are taken too. No
  export at ``path``: ``ExportNotFound``; a dtype of none of those: ``ExportDtypeError``.
  """
  path = fs.as_path(path)
  dtype = _dtype_name(dtype)
  if not (path / MODEL_FILE).exists():
    raise ExportNotFound(f"No {MODEL_FILE} in {path}: export a run first with python -m emim.export.")
  try:
    meta = json.loads((path / MODEL_FILE).read_text())
  except ValueError as e:
    raise ExportError(f"{path / MODEL_FILE} is not valid JSON ({e}): export the run again.") from e
  meta = {**meta, "dtype": dtype} if dtype else meta
  skeleton = backbone_from_model_config(meta, {})
  example = np.zeros((1,) + input_shape_of(meta), np.float32)
  template = jax.eval_shape(lambda: skeleton.model.init(jax.random.PRNGKey(0), example, train=False))
  template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
  try:
    variables = flax.serialization.from_bytes(template, (path / BACKBONE_FILE).read_bytes())
  except Exception as e:  # msgpack raises several types for a truncated or foreign file
    raise ExportError(f"Cannot read {path / BACKBONE_FILE} ({type(e).__name__}: {e}): it is truncated, or not the "
                      f"backbone {MODEL_FILE} describes. Export the run again.") from e
  shapes = lambda tree: [np.shape(x) for x in jax.tree.leaves(tree)]
  if shapes(variables) != shapes(template):
    raise ExportError(f"{path / BACKBONE_FILE} holds other shapes than the model {path / MODEL_FILE} describes "
                      f"({meta.get('backbone')}, width {meta.get('width')}): the two files are of different exports. "
                      "Export the run again.")
  backbone = backbone_from_model_config(meta, variables)
  return backbone, checked_features(backbone, backbone.features_fn())


def _dtype_name(dtype) -> str | None:
  """load_backbone's ``dtype`` as DTYPES names it: a name, or a dtype object naming one
  (jnp.float32, np.float32, jnp.bfloat16 are what a JAX user passes); else ExportDtypeError."""
  if dtype is None or (isinstance(dtype, str) and dtype in DTYPES):
    return dtype
  name = None
  if not isinstance(dtype, str):  # a name is taken as written: "fp32" or "Float32" is no dtype of JAX's either
    try:
      name = np.dtype(dtype).name
    except Exception:  # noqa: BLE001  (a list, a module: numpy raises TypeError or ValueError)
      name = None
  if name not in DTYPES:
    raise ExportDtypeError(f"load_backbone(dtype={dtype!r}): give one of {', '.join(sorted(DTYPES))} (a name, or "
                           "jnp.float32 ...), or None for the dtype it trained in.")
  return name


# Float images are taken as [0, 1]; a little beyond it (a resize's overshoot) is allowed.
_FLOAT_RANGE_SLACK = 1e-3


def checked_features(backbone: Backbone, features):
  """``features`` that refuses float images outside [0, 1] (0-255 floats would give
  features hundreds of times too large, silently) and says, once, when the images are not
  the size the backbone was trained at. Vectors (the MLP backbone) pass as they are."""
  said_size = []

  def checked(images):
    if len(backbone.input_shape) == 1:
      return features(images)
    if not hasattr(images, "dtype"):  # a list
      images = np.asarray(images)
    shape = tuple(np.shape(images))
    if len(shape) != 4 or shape[-1] != 3:
      raise ExportError(f"The images are of shape {shape}: give a batch (N, H, W, 3), uint8 in 0-255 or float in "
                        "[0, 1].")
    if np.dtype(images.dtype) != np.uint8:
      lo, hi = (float(v) for v in jax.device_get((images.min(), images.max())))
      if lo < -_FLOAT_RANGE_SLACK or hi > 1 + _FLOAT_RANGE_SLACK:
        hint = " (they look like 0-255: divide by 255, or pass uint8)" if hi > 2 else ""
        raise ExportError(f"Float images must be in [0, 1]; these range from {lo:.4g} to {hi:.4g}{hint}. (The "
                          "backbone normalises them with the training mean and std itself.)")
    size = backbone.image_size
    if shape[1:3] != (size, size) and not said_size:
      said_size.append(shape[1:3])
      logging.warning("The images are %dx%d; this backbone was trained at %dx%d: %s. Features of images of the "
                      "training size are those the evaluation measured. (Said once.)", shape[1], shape[2], size, size,
                      f"they are centre-cropped to {size}x{size} (not resized)" if shape[1] > size else
                      f"they are resized up to {size}x{size}")
    return features(images)

  return checked


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  quiet_orbax_logs()
  FLAGS = flags.FLAGS
  check_output(FLAGS.output, FLAGS.overwrite, FLAGS.workdir)  # before any work
  step = None if FLAGS.checkpoint_step < 0 else FLAGS.checkpoint_step
  if step is None:  # fixed now, so the config and the parameters are of one checkpoint
    step = ckpt_lib.latest_step(checkpoint_dir(FLAGS.workdir))
  config = load_run_config(FLAGS.workdir, step)
  step, backbone = restore_backbone(FLAGS.workdir, config, step)
  out = export_backbone(backbone, FLAGS.output, {"step": step, "method": config.method.name}, FLAGS.overwrite)
  logging.info("Exported the backbone at step %d to %s.", step, out)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "The training run's work directory.")
  flags.DEFINE_string("output", None, "Directory to write the export to.")
  flags.DEFINE_integer("checkpoint_step", -1, "Checkpoint step; -1 for the latest.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing export in --output.")
  flags.mark_flags_as_required(["workdir", "output"])
  cli.run(main)
