"""config.sharding.params on 8 simulated CPU devices: the fsdp rule, the state created
sharded as it says, a step under fsdp equal to the replicated step, and a checkpoint
written under fsdp resumed on 4 devices, replicated."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config, tiny_synthetic
from jax.sharding import PartitionSpec as P

from emim import sharding, train
from emim.train_step import init_state, train_step

VIT = {"model.backbone": "vit_tiny", "model.patch_size": 4, "optim.name": "adamw", "optim.base_lr": 1e-3}


def test_fsdp_splits_the_largest_divisible_dimension_of_large_arrays_only():
  mib = 2**20
  assert sharding.fsdp_spec((2, 32, 128), 4 * mib, 8, mib) == P(None, None, "data")
  assert sharding.fsdp_spec((1024, 12), 4 * mib, 8, mib) == P("data")
  assert sharding.fsdp_spec((12, 1000), 4 * mib, 8, mib) == P(None, "data")  # 1000 = 8 x 125
  assert sharding.fsdp_spec((12, 1001), 4 * mib, 8, mib) == P()  # 8 divides neither: replicated
  assert sharding.fsdp_spec((4096, 4096), mib - 1, 8, mib) == P()  # under the threshold: replicated
  assert sharding.fsdp_spec((4096, 4096), 64 * mib, 1, mib) == P()  # one device: nothing to split


def _parts_and_state(config, mesh):
  parts = train.build_parts(config, 10, 16, 4)
  abstract, state_sharding = train.state_shapes(parts, mesh, config.sharding)
  state = jax.jit(functools.partial(init_state, parts), out_shardings=state_sharding)(jax.random.PRNGKey(0))
  return parts, state, state_sharding


def test_the_state_is_created_sharded_as_the_rule_says():
  config = tiny_synthetic("byol,runlocal", **VIT, **{"sharding.params": "fsdp", "sharding.fsdp_min_mib": 0.001})
  mesh = sharding.make_mesh()
  _, state, _ = _parts_and_state(config, mesh)
  split = 0
  for path, x in jax.tree_util.tree_leaves_with_path(state):
    expected = sharding.fsdp_spec(x.shape, x.nbytes, 8, 0.001 * 2**20)
    assert x.sharding.spec == expected, jax.tree_util.keystr(path)
    shard_bytes = {s.data.nbytes for s in x.addressable_shards}
    if expected != P():
      split += 1
      assert shard_bytes == {x.nbytes // 8}, jax.tree_util.keystr(path)
    else:
      assert shard_bytes == {x.nbytes}
  # Params, both Adam moments and the EMA target alike: the qkv kernel (2, 32, 3, 2, 16)
  # split along its width (32) in each.
  qkv = [(jax.tree_util.keystr(path), x) for path, x in jax.tree_util.tree_leaves_with_path(state)
         if "'qkv'" in jax.tree_util.keystr(path) and "'kernel'" in jax.tree_util.keystr(path)]
  assert len(qkv) == 4, [p for p, _ in qkv]  # params, target, mu, nu
  assert all(x.shape == (2, 32, 3, 2, 16) and x.sharding.spec == P(None, "data") for _, x in qkv)
  assert split > 20


def test_auto_replicates_small_states_and_shards_a_vit_l():
  mesh = sharding.make_mesh()
  for backbone, rule in (("vit_b16", "replicate"), ("vit_l16", "fsdp")):
    config = load_config("imagenet1k", "vit_b16")
    with config.unlocked():
      config.model.backbone = backbone
    parts = train.build_parts(config, 1000, 1251, 125100)
    abstract = jax.eval_shape(functools.partial(init_state, parts), jax.random.PRNGKey(0))
    gib = sharding.state_bytes(abstract) / 2**30
    assert sharding.resolve_params_rule("auto", abstract, mesh) == rule, (backbone, gib)
    # The log says what auto chose, and why.
    line = train.sharding_summary(abstract, sharding.state_sharding(abstract, mesh, "auto"), mesh, config.sharding)
    why = "over" if rule == "fsdp" else "within"
    assert f"sharding.params=auto, so {rule} ({why} sharding.auto_fsdp_gib=2 GiB per device)" in line, line
    assert line.startswith(f"{gib * 1024:.1f} MiB"), line
  one = sharding.make_mesh(jax.devices()[:1])
  assert sharding.resolve_params_rule("auto", abstract, one) == "replicate"
  line = train.sharding_summary(abstract, sharding.state_sharding(abstract, one, "auto"), one, config.sharding)
  assert "sharding.params=auto, so replicate (one device): 0 of its" in line, line


class _OneBatch:
  """A data source that is one global batch, as a streamed pipeline gives it."""

  def __init__(self, batch, mesh):
    self.input_sharding = sharding.batch_sharding(mesh)
    self._batch = jax.device_put(batch, self.input_sharding)

  def step_fn(self, parts):
    return functools.partial(train_step, parts=parts)

  def example_input(self):
    return self._batch


def _all_gathered_shapes(hlo_text):
  return {tuple(int(d) for d in m.group(1).split(",") if d)
          for m in re.finditer(r"= \w+\[([0-9,]*)\]\S* all-gather\(", hlo_text)}


@pytest.mark.parametrize("model", ["vit_tiny", "resnet_tiny"])
def test_a_step_under_fsdp_equals_the_replicated_step(model):
  """Two steps compiled as the loop compiles them (train.compile_train_step) give the same
  state and metrics under fsdp as replicated. Under fsdp the compiled step all-gathers every
  split parameter to its whole shape (data-parallel compute): without the gather the
  compiler split the activations instead and gathered 2 of the tiny ViT's 14 split weights
  (ViT-L/16 on a v5litepod-8: 18.6 GiB gathered and 10.3 GiB all-reduced per chip per
  step, against 0.14 GiB all-reduced replicated)."""
  overrides = {"optim.name": "sgd", "optim.base_lr": 0.5, "optim.warmup_epochs": 0}
  if model == "vit_tiny":
    overrides.update({"model.backbone": "vit_tiny", "model.patch_size": 4})
  mesh = sharding.make_mesh()
  rng = np.random.default_rng(0)
  data = _OneBatch({"images": rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8),
                    "labels": rng.integers(0, 10, (32,), dtype=np.int32)}, mesh)
  results = {}
  for rule in ("replicate", "fsdp"):
    config = tiny_synthetic("byol,runlocal", **overrides, **{"sharding.params": rule, "sharding.fsdp_min_mib": 0.0})
    parts, state, state_sharding = _parts_and_state(config, mesh)
    step, interval = train.compile_train_step(parts, data, state, state_sharding, mesh)
    for _ in range(2):
      state, interval = step(state, data.example_input(), interval)
    results[rule] = jax.device_get((state, interval))
    if rule == "fsdp":
      split = {x.shape for x in jax.tree.leaves(state.params) if x.sharding.spec != P()}
      assert len(split) > (10 if model == "vit_tiny" else 0)
      gathered = _all_gathered_shapes(step.as_text())
      assert split <= gathered, sorted(split - gathered)
  (replicated, interval_r), (fsdp, interval_f) = results["replicate"], results["fsdp"]
  for a, b in zip(jax.tree.leaves(interval_r), jax.tree.leaves(interval_f)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
  # Equal to float rounding (the collectives sum in another order). SGD with momentum
  # (its trace: the gradients), not AdamW: Adam scales a gradient that is zero but for rounding (the bias before a
  # BatchNorm) to a full step, which would compare rounding noise.
  for a, b in zip(jax.tree.leaves((replicated.params, replicated.target, replicated.opt_state)),
                  jax.tree.leaves((fsdp.params, fsdp.target, fsdp.opt_state))):
    a, b = np.asarray(a), np.asarray(b)  # (rounding is relative to the leaf's scale, not to each element)
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 + 1e-5 * np.abs(a).max())


@pytest.mark.slow
def test_a_checkpoint_written_under_fsdp_resumes_on_4_devices_replicated(tmp_path, monkeypatch):
  """8 devices, fsdp, stopped at step 2; resumed on 4 devices with a replicated state:
  the same parameters at step 4 as an uninterrupted fsdp run, to float rounding (another
  device count sums in another order)."""
  config = tiny_synthetic("runlocal", **{**VIT, "sharding.params": "fsdp", "sharding.fsdp_min_mib": 0.0,
                                        "checkpoint.async_save": False, "eval.mi_every_steps": 0,
                                        "optim.name": "sgd", "optim.base_lr": 0.5})  # (SGD: see above)
  straight = train.run(config, str(tmp_path / "straight"))
  first = train.run(config, str(tmp_path / "interrupted"), stop_at_step=2)
  assert int(first.state.step) == 2
  assert any(x.sharding.spec != P() for x in jax.tree.leaves(first.state.params))
  real_make_mesh = sharding.make_mesh
  monkeypatch.setattr(sharding, "make_mesh", lambda devices=None: real_make_mesh(jax.devices()[:4]))
  with config.unlocked():
    config.sharding.params = "replicate"
  resumed = train.run(config, str(tmp_path / "interrupted"))
  assert int(resumed.state.step) == 4
  leaves = jax.tree.leaves(resumed.state.params)
  assert all(len(x.sharding.device_set) == 4 and x.sharding.spec == P() for x in leaves)
  for a, b in zip(jax.tree.leaves(jax.device_get((straight.state.params, straight.state.target))),
                  jax.tree.leaves(jax.device_get((resumed.state.params, resumed.state.target)))):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6 + 1e-5 * np.abs(a).max())


def test_a_rule_or_vit_name_given_to_the_library_directly_is_a_config_error():
  """A notebook calling these without emim.main's validation gets the one-line error too."""
  from emim.config_base import ConfigError
  from emim.models import vit

  with pytest.raises(ConfigError, match="sharding.params='fsdpp': choose one of replicate, fsdp, auto"):
    sharding.resolve_params_rule("fsdpp", {}, sharding.make_mesh(jax.devices()[:1]))
  with pytest.raises(ConfigError, match="model.backbone='vit_x16'"):
    vit.make_backbone("vit_x16")
  with pytest.raises(ConfigError, match="model.remat_policy=.everything."):
    vit.make_backbone("vit_s16", remat_policy="everything")


def test_a_negative_sharding_size_is_named_alone():
  # The line named both fsdp_min_mib and auto_fsdp_gib whichever of the two was negative.
  from emim.config_base import ConfigError, validate
  from conftest import tiny_synthetic

  for field in ("fsdp_min_mib", "auto_fsdp_gib"):
    other = ({"fsdp_min_mib", "auto_fsdp_gib"} - {field}).pop()
    with pytest.raises(ConfigError, match=rf"sharding.{field}=-1.0: give a size") as e:
      validate(tiny_synthetic(**{f"sharding.{field}": -1.0}))
    assert other not in str(e.value)
