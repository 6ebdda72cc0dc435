"""The ViT backbones (emim/models/vit.py): published sizes, attention against a direct
computation, position embeddings at another resolution, and a train step of EMMI and
BYOL on a tiny ViT. Tiny models (width 32, depth 2): each compiles in seconds."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config, tiny_synthetic

from emim import models, optim, train
from emim.models import vit
from emim.train_step import init_state, train_step

# timm's parameter counts of the same models without a classifier (num_classes=0), e.g.
# sum(p.numel() for p in timm.create_model("vit_small_patch16_224", num_classes=0).parameters()).
# timm also gives the class token a position embedding; emim's class token absorbs it
# (two learned constants added), one width fewer.
TIMM_PARAMS = {"vit_s16": 21_665_664, "vit_b16": 85_798_656, "vit_l16": 303_301_632}


def param_count(name, image_size=224, patch_size=16):
  model = vit.make_backbone(name, patch_size=patch_size, image_size=image_size)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3)),
                                             train=False))
  return model, sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("name", sorted(TIMM_PARAMS))
def test_published_sizes_have_the_published_parameter_counts_and_feature_width(name):
  model, count = param_count(name)
  assert count + model.width == TIMM_PARAMS[name]
  features = jax.eval_shape(lambda v, x: model.apply(v, x, train=False),
                            jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)),
                                                              train=False)),
                            jax.ShapeDtypeStruct((4, 224, 224, 3), jnp.float32))
  assert features.shape == (4, model.feature_dim) and features.dtype == jnp.float32
  assert (vit.ARCHITECTURES["vit_ti16"].width, vit.ARCHITECTURES["vit_ti16"].depth,
          vit.ARCHITECTURES["vit_ti16"].heads) == (192, 12, 3)


def test_attention_equals_a_direct_softmax_computation():
  heads, width, tokens = 4, 32, 7
  module = vit.Attention(heads)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, tokens, width))
  params = module.init(jax.random.PRNGKey(1), x)["params"]
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)  # non-zero biases
  out = module.apply({"params": params}, x)

  x64 = np.asarray(x, np.float64)
  w = np.asarray(params["qkv"]["kernel"], np.float64).reshape(width, 3 * width)
  b = np.asarray(params["qkv"]["bias"], np.float64).reshape(3 * width)
  qkv = (x64 @ w + b).reshape(3, tokens, 3, heads, width // heads)
  q, k, v = (np.moveaxis(qkv[:, :, i], 2, 1) for i in range(3))  # (B, heads, T, d)
  logits = q @ np.swapaxes(k, -1, -2) / np.sqrt(width // heads)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  y = np.moveaxis(weights @ v, 1, 2).reshape(3, tokens, width)
  expected = y @ np.asarray(params["proj"]["kernel"], np.float64).reshape(width, width) + np.asarray(params["proj"]["bias"])
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_the_same_parameters_run_at_another_resolution_through_resampled_position_embeddings():
  """A ViT trained at 32x32 (an 8x8 grid of 4-pixel patches) applied to 48x48 images (12x12)
  computes what a ViT stored for 48x48 computes with the bilinearly resized embeddings."""
  small = vit.make_backbone("vit_tiny", patch_size=4, image_size=32)
  large = vit.make_backbone("vit_tiny", patch_size=4, image_size=48)
  variables = small.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
  posemb = variables["params"]["pos_embedding"]
  assert posemb.shape == (1, 8, 8, 32)
  resized = jax.tree.map(lambda x: x, variables)
  resized["params"]["pos_embedding"] = jax.image.resize(posemb, (1, 12, 12, 32), "bilinear")
  images = jax.random.uniform(jax.random.PRNGKey(1), (2, 48, 48, 3))
  at_48 = small.apply(variables, images, train=False)
  np.testing.assert_allclose(at_48, large.apply(resized, images, train=False), rtol=1e-5, atol=1e-5)
  # The embeddings matter: other ones give other features.
  shifted = jax.tree.map(lambda x: x, variables)
  shifted["params"]["pos_embedding"] = posemb[:, ::-1]
  assert not np.allclose(at_48, small.apply(shifted, images, train=False), atol=1e-4)
  # At the stored resolution, no resampling.
  assert vit.resample_position_embedding(posemb, (8, 8)) is posemb


def test_weight_decay_skips_the_scanned_biases_and_layernorm_scales():
  model = vit.make_backbone("vit_tiny", patch_size=4, image_size=32)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)["params"]
  mask = optim.decay_mask(params)
  assert params["blocks"]["norm1"]["scale"].ndim == 2 and not mask["blocks"]["norm1"]["scale"]
  assert params["blocks"]["fc1"]["bias"].ndim == 2 and not mask["blocks"]["fc1"]["bias"]
  assert mask["blocks"]["fc1"]["kernel"] and mask["pos_embedding"] and mask["patch_embed"]["kernel"]
  assert not mask["norm"]["scale"] and not mask["patch_embed"]["bias"]


@pytest.mark.parametrize("method", ["emmi", "byol"])
def test_a_train_step_on_a_tiny_vit_is_finite_and_moves_the_parameters(method):
  config = tiny_synthetic(f"{method},runlocal", **{"model.backbone": "vit_tiny", "model.patch_size": 4,
                                                   "model.drop_path": 0.2, "model.dtype": "bfloat16",
                                                   "optim.name": "adamw", "optim.base_lr": 1e-3})
  parts = train.build_parts(config, 10, 16, 4)
  state = init_state(parts, jax.random.PRNGKey(0))
  assert "backbone" not in state.batch_stats["encoder"]  # a ViT has no BatchNorm (the projector has)
  rng = np.random.default_rng(0)
  batch = {"images": jnp.asarray(rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)),
           "labels": jnp.asarray(rng.integers(0, 10, (32,), dtype=np.int32))}
  step = jax.jit(functools.partial(train_step, parts=parts))
  new_state, metrics = step(state, batch)
  new_state, metrics = step(new_state, batch)  # step 1: the warm-up's learning rate is > 0
  assert np.isfinite(float(metrics["loss"])) and float(metrics["finite"]) == 1.0
  before = state.params["encoder"]["backbone"]
  after = new_state.params["encoder"]["backbone"]
  for name in ("pos_embedding", "cls_token"):
    assert not np.allclose(before[name], after[name]), name
  assert not np.allclose(before["blocks"]["attn"]["qkv"]["kernel"], after["blocks"]["attn"]["qkv"]["kernel"])
  assert {leaf.dtype for leaf in jax.tree.leaves(new_state.params)} == {jnp.dtype(jnp.float32)}
  if method == "byol":  # the EMA target moved towards the online backbone
    target = new_state.target["params"]["backbone"]["pos_embedding"]
    assert not np.allclose(target, before["pos_embedding"])


def test_drop_path_draws_in_train_mode_with_a_dropout_key_only():
  model = vit.make_backbone("vit_tiny", patch_size=4, image_size=32, drop_path=0.5)
  x = jax.random.uniform(jax.random.PRNGKey(1), (8, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  plain = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(plain, model.apply(variables, x, train=True))  # no key: the target's forward
  a = model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
  b = model.apply(variables, x, train=True, rngs={"dropout": jax.random.PRNGKey(3)})
  assert not np.allclose(a, plain, atol=1e-5) and not np.allclose(a, b, atol=1e-5)


def test_vit_configs_and_a_bad_patch_size_is_one_line_naming_the_field():
  from emim.config_base import ConfigError, validate

  c = load_config("cifar10", "vit_s")
  assert (c.model.backbone, c.model.patch_size, c.optim.name) == ("vit_s16", 4, "adamw")
  for name in ("imagenet1k", "imagenet100"):
    for variant, backbone in (("vit_s16", "vit_s16"), ("vit_b16", "vit_b16"), ("vit_l16", "vit_l16")):
      c = load_config(name, variant)
      assert (c.model.backbone, c.model.patch_size, c.data.image_size) == (backbone, 16, 224)
  tiny = load_config("cifar10", "vit_s,runlocal")
  assert tiny.model.backbone == "vit_tiny" and tiny.model.patch_size == 4
  with tiny.unlocked():
    tiny.model.patch_size = 5
  with pytest.raises(ConfigError, match="model.patch_size=5"):
    validate(tiny)
  assert models.is_vit("vit_l16") and not models.is_vit("resnet50")


def test_adamw_weight_decay_follows_dinos_cosine_from_start_to_end():
  import ml_collections
  import optax

  cfg = ml_collections.ConfigDict(dict(name="adamw", weight_decay=0.04, weight_decay_end=0.4, clip_norm=0.0))
  tx = optim.make_optimizer(cfg, optax.constant_schedule(1.0), total_steps=10)
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  state = tx.init(params)
  decays = []
  for _ in range(11):  # zero gradients: the update is -lr * wd(t) * p for the kernel only
    updates, state = tx.update(zeros, state, params)
    decays.append(-float(updates["dense"]["kernel"][0, 0]))
    assert float(updates["dense"]["bias"][0]) == 0.0
  np.testing.assert_allclose([decays[0], decays[5], decays[10]], [0.04, 0.22, 0.4], rtol=1e-5)


def test_a_bfloat16_vits_export_loads_in_float32_when_asked(tmp_path):
  """emim.load_backbone computes in the dtype the backbone trained in (model.json's);
  ``dtype="float32"`` gives a bfloat16-trained ViT's features without bfloat16's rounding,
  equal to the float32 model of the same parameters."""
  import emim
  from emim import export
  from emim.backbone import init_backbone

  model_config = {"backbone": "vit_tiny", "width": 64, "cifar_stem": False, "dtype": "bfloat16", "patch_size": 4,
                  "image_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3}
  out = export.export_backbone(init_backbone(model_config), tmp_path / "export", {"step": 0})
  images = np.random.default_rng(0).uniform(size=(4, 16, 16, 3)).astype(np.float32)
  in_float32 = init_backbone({**model_config, "dtype": "float32"})  # the same parameters (seed 0), float32 compute
  reference = np.asarray(in_float32.features_fn()(images))
  loaded, features = emim.load_backbone(out, dtype="float32")
  assert loaded.model.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(features(images)), reference, rtol=1e-5, atol=1e-5)
  as_trained = np.asarray(emim.load_backbone(out)[1](images))  # bfloat16: close, not equal
  assert np.abs(as_trained - reference).max() > 1e-4
  np.testing.assert_allclose(as_trained, reference, atol=0.1 * np.abs(reference).max())
  with pytest.raises(export.ExportDtypeError,
                     match=r"load_backbone\(dtype=.f32.\): give one of bfloat16, float16, float32"):
    emim.load_backbone(out, dtype="f32")


def test_load_backbones_mistakes_are_user_errors_and_jax_dtypes_are_taken(tmp_path):
  """A dtype of JAX's (jnp.float32, np.float32) is the name it stands for; a dtype that names
  none, or a path with no export, is a UserError naming the fix (a ValueError and a
  FileNotFoundError were a traceback where a program catches UserError)."""
  import emim
  from emim import export
  from emim.backbone import init_backbone
  from emim.errors import UserError

  model_config = {"backbone": "mlp", "width": 16, "cifar_stem": False, "dtype": "bfloat16", "image_size": 0,
                  "input_shape": [8], "mean": [0.0], "std": [1.0]}
  out = export.export_backbone(init_backbone(model_config), tmp_path / "export", {"step": 0})
  x = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
  reference = np.asarray(init_backbone({**model_config, "dtype": "float32"}).features_fn()(x))
  for dtype in ("float32", jnp.float32, np.float32, np.dtype("float32")):
    loaded, features = emim.load_backbone(out, dtype=dtype)
    assert loaded.model.dtype == jnp.float32 and loaded.model_config["dtype"] == "float32", dtype
    np.testing.assert_allclose(np.asarray(features(x)), reference, rtol=1e-5, atol=1e-6)
  assert emim.load_backbone(out, dtype=jnp.bfloat16)[0].model.dtype == jnp.bfloat16
  for dtype in ("fp32", "Float32", " float32", "", np.float64, ["float32"], object()):
    with pytest.raises(export.ExportDtypeError, match=r"load_backbone\(dtype=.*\): give one of bfloat16, float16, "
                                                      r"float32"):
      emim.load_backbone(out, dtype=dtype)
  for dtype in ("float32", None):
    with pytest.raises(export.ExportNotFound, match=r"No model.json in .*nowhere: export a run first") as missing:
      emim.load_backbone(tmp_path / "nowhere", dtype=dtype)
    assert isinstance(missing.value, UserError) and isinstance(missing.value, FileNotFoundError)
  assert issubclass(export.ExportDtypeError, UserError) and issubclass(export.ExportDtypeError, ValueError)
