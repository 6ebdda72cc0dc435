"""Export a trained backbone for downstream jobs: JAX and PyTorch (torchvision layout).

    python -m emim.export --workdir=runs/cifar10 --output=exports/cifar10 [--checkpoint_step=N]

writes to --output:
  backbone.msgpack                   params and BatchNorm statistics (flax.serialization)
  model.json                         what rebuilds the model: architecture, width, stem,
                                     input size and normalisation, step, method
  torchvision_resnet.safetensors     a torchvision ResNet state dict (no ``fc``); for the
                                     CIFAR stem replace ``conv1`` by a 3x3 stride-1 conv and
                                     ``maxpool`` by ``nn.Identity()`` before loading

A downstream job needs one call:
    model, features = emim.load_backbone("exports/cifar10")
    feats = features(images)   # uint8 or [0, 1] float, (N, H, W, 3) -> (N, D)
"""

from __future__ import annotations

import json
import pathlib

import flax.serialization
import jax
import numpy as np
from absl import app, flags, logging

from emim.backbone import Backbone, backbone_from_model_config, load_run_config, restore_backbone
from emim.checkpoint import quiet_orbax_logs

BACKBONE_FILE, MODEL_FILE, TORCH_FILE = "backbone.msgpack", "model.json", "torchvision_resnet.safetensors"


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


def export_backbone(backbone: Backbone, output: str | pathlib.Path, info: dict | None = None) -> pathlib.Path:
  """Write the three export files to ``output``; returns the directory."""
  from safetensors.numpy import save_file

  output = pathlib.Path(output)
  output.mkdir(parents=True, exist_ok=True)
  variables = jax.device_get(backbone.variables)
  (output / BACKBONE_FILE).write_bytes(flax.serialization.to_bytes(variables))
  meta = {**backbone.model_config, "feature_dim": backbone.feature_dim, **(info or {})}
  (output / MODEL_FILE).write_text(json.dumps(meta, indent=2))
  save_file(torchvision_state_dict(backbone), str(output / TORCH_FILE))
  return output


def load_backbone(path: str | pathlib.Path):
  """Load an exported backbone: returns (Backbone, jitted features(images) -> (N, D)).

  Images are (N, H, W, 3), uint8 or float in [0, 1]; they are centre-cropped to the
  training size when larger and normalised as in training.
  """
  path = pathlib.Path(path)
  if not (path / MODEL_FILE).exists():
    raise FileNotFoundError(f"No {MODEL_FILE} in {path}: export a run first with python -m emim.export.")
  meta = json.loads((path / MODEL_FILE).read_text())
  skeleton = backbone_from_model_config(meta, {})
  size = meta["image_size"]
  template = jax.eval_shape(lambda: skeleton.model.init(jax.random.PRNGKey(0), np.zeros((1, size, size, 3), np.float32), train=False))
  template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
  variables = flax.serialization.from_bytes(template, (path / BACKBONE_FILE).read_bytes())
  backbone = backbone_from_model_config(meta, variables)
  return backbone, backbone.features_fn()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  quiet_orbax_logs()
  FLAGS = flags.FLAGS
  config = load_run_config(FLAGS.workdir)
  step, backbone = restore_backbone(FLAGS.workdir, config, None if FLAGS.checkpoint_step < 0 else FLAGS.checkpoint_step)
  out = export_backbone(backbone, FLAGS.output, {"step": step, "method": config.method.name})
  logging.info("Exported the backbone at step %d to %s.", step, out)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "The training run's work directory.")
  flags.DEFINE_string("output", None, "Directory to write the export to.")
  flags.DEFINE_integer("checkpoint_step", -1, "Checkpoint step; -1 for the latest.")
  flags.mark_flags_as_required(["workdir", "output"])
  app.run(main)
