"""The timm-layout export of a ViT gives the same features in PyTorch as in JAX, and
timm's models of the same names load it."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config

from emim import export
from emim.backbone import backbone_from_model_config, init_backbone, model_config_of

torch = pytest.importorskip("torch", reason="PyTorch (CPU) is needed to check the timm export")
try:
  import timm
except Exception as e:  # not installed, or a torchvision built for another torch (a RuntimeError on import)
  pytest.skip(f"timm cannot be imported here ({type(e).__name__}: {e}); the timm export test needs timm and a "
              "torchvision built for the installed torch (docs/install.md, 'The tests').", allow_module_level=True)


def tiny_vit_config():
  config = load_config("synthetic", "runlocal")
  with config.unlocked():
    config.model.backbone, config.model.patch_size, config.model.dtype = "vit_tiny", 4, "float32"
    config.data.image_size = 32
  return config


def perturbed(backbone, config, seed=0):
  """Every parameter moved by noise: LayerNorm scales off 1, biases off 0, the class
  token and the position embeddings far from their near-zero initialisation, so that a
  misplaced or mis-ordered tensor changes the features."""
  rng = np.random.default_rng(seed)
  variables = jax.tree.map(lambda x: np.asarray(x) + 0.2 * rng.normal(size=x.shape).astype(np.float32),
                           backbone.variables)
  return backbone_from_model_config(model_config_of(config), variables)


def timm_features(model, images, config):
  normalised = (images - np.array(config.data.mean, np.float32)) / np.array(config.data.std, np.float32)
  with torch.no_grad():
    return model(torch.from_numpy(normalised).permute(0, 3, 1, 2)).numpy()


def test_timm_export_loads_strictly_and_gives_the_same_features(tmp_path):
  from safetensors.torch import load_file
  from timm.models.vision_transformer import VisionTransformer

  config = tiny_vit_config()
  backbone = perturbed(init_backbone(model_config_of(config)), config)
  out = export.export_backbone(backbone, tmp_path / "export", {"step": 7})
  assert sorted(p.name for p in out.iterdir()) == ["backbone.msgpack", "model.json", "timm_vit.safetensors"]
  meta = json.loads((out / export.MODEL_FILE).read_text())
  # vit_tiny with 4-pixel patches at 32x32 has no timm name: the constructor's keywords.
  assert meta["timm"] == {"model": None, "kwargs": {
      "img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 4.0,
      "num_classes": 0, "global_pool": "token", "class_token": True}}
  model = VisionTransformer(**meta["timm"]["kwargs"])
  model.load_state_dict(load_file(str(out / export.TIMM_FILE)), strict=True)
  model.eval()

  rng = np.random.default_rng(1)
  images = rng.uniform(size=(4, 32, 32, 3)).astype(np.float32)
  jax_features = np.asarray(backbone.features_fn()(images))
  torch_features = timm_features(model, images, config)
  assert torch_features.shape == (4, 32) and np.std(jax_features) > 0.1
  np.testing.assert_allclose(torch_features, jax_features, rtol=1e-4, atol=1e-4)
  # emim.load_backbone on the same export: the same features as the exported backbone.
  _, features = export.load_backbone(out)
  np.testing.assert_allclose(np.asarray(features(images)), jax_features, rtol=1e-5, atol=1e-5)


def emim_vit(backbone_name, patch_size, image_size):
  """A ViT backbone without variables (enough for its timm name and keywords)."""
  return backbone_from_model_config({"backbone": backbone_name, "width": 64, "cifar_stem": False, "dtype": "float32",
                                     "patch_size": patch_size, "image_size": image_size, "mean": [0.5] * 3,
                                     "std": [0.25] * 3}, {})


def meta_shapes(build):
  """The state dict's shapes of a timm model built on PyTorch's meta device (no memory,
  no initialisation)."""
  with torch.device("meta"):
    model = build()
  return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_the_exported_dict_of_vit_ti16_has_the_keys_and_shapes_of_timms_model_of_that_name():
  backbone = emim_vit("vit_ti16", 16, 224)
  assert export.timm_vit_model(backbone)["model"] == "vit_tiny_patch16_224"
  shapes = jax.eval_shape(lambda: backbone.model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)),
                                                      train=False))
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)  # 5.7 M zeros: no init
  exported = export.timm_state_dict(backbone_from_model_config(backbone.model_config, variables))
  assert {k: v.shape for k, v in exported.items()} == meta_shapes(
      lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0))
  assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in exported.values())


@pytest.mark.parametrize("name", sorted(export._TIMM_VIT_NAMES))
def test_each_timm_name_given_is_timms_model_of_the_keywords_given(name):
  """Every name model.json can carry is the model its keywords build (size, patch and the
  resolution timm's registered config sets), so either way loads the same dict."""
  size, patch, resolution = re.fullmatch(r"vit_(\w+)_patch(\d+)_(\d+)", name).groups()
  emim_name = {v: k for k, v in export._TIMM_VIT_SIZES.items()}[size]
  given = export.timm_vit_model(emim_vit(emim_name, int(patch), int(resolution)))
  assert given["model"] == name
  from timm.models.vision_transformer import VisionTransformer

  named = meta_shapes(lambda: timm.create_model(name, pretrained=False, num_classes=0))
  assert named == meta_shapes(lambda: VisionTransformer(**given["kwargs"]))
  assert named["pos_embed"] == (1, 1 + (int(resolution) // int(patch)) ** 2, given["kwargs"]["embed_dim"])


def test_a_size_or_resolution_timm_has_no_name_for_gives_keywords_only():
  assert export.timm_vit_model(emim_vit("vit_s16", 4, 32))["model"] is None  # CIFAR's ViT-S/4
  assert export.timm_vit_model(emim_vit("vit_b16", 16, 160))["model"] is None
  assert export.timm_vit_model(emim_vit("vit_tiny", 16, 224))["model"] is None


@pytest.mark.parametrize("remote", [False, True])
def test_an_export_over_another_architectures_keeps_none_of_its_files(tmp_path, request, remote):
  # On an object store --overwrite wrote the new files over the old ones and left the rest: a ResNet's
  # torchvision_resnet.safetensors stayed beside the ViT's export (and a ViT's timm file beside a ResNet's).
  root = request.getfixturevalue("fake_gcs") if remote else tmp_path
  resnet = init_backbone(model_config_of(load_config("synthetic", "runlocal")))
  vit = init_backbone(model_config_of(tiny_vit_config()))
  out = export.export_backbone(resnet, f"{root}/export", {"step": 1})
  assert sorted(p.name for p in out.iterdir()) == ["backbone.msgpack", "model.json", "torchvision_resnet.safetensors"]
  out = export.export_backbone(vit, f"{root}/export", {"step": 2}, overwrite=True)
  assert sorted(p.name for p in out.iterdir()) == ["backbone.msgpack", "model.json", "timm_vit.safetensors"]
  out = export.export_backbone(resnet, f"{root}/export", {"step": 3}, overwrite=True)
  assert sorted(p.name for p in out.iterdir()) == ["backbone.msgpack", "model.json", "torchvision_resnet.safetensors"]
  assert json.loads((out / export.MODEL_FILE).read_text())["step"] == 3
