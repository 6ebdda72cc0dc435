"""Both views through one forward (config.model.fused_views): GroupedBatchNorm computes
what a BatchNorm per view computes, and the fused train step equals the step with a
forward per view."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_synthetic

from emim import train
from emim.data import sources
from emim.models.norm import GroupedBatchNorm
from emim.train_step import init_state, train_step


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_grouped_batchnorm_is_a_batchnorm_per_interleaved_view(dtype):
  rng = np.random.default_rng(0)
  x1 = jnp.asarray(rng.normal(1.0, 2.0, (8, 4, 4, 6)), dtype)
  x2 = jnp.asarray(rng.normal(-1.0, 0.5, (8, 4, 4, 6)), dtype)  # other statistics than view 1
  variables = {"params": {"scale": jnp.arange(6.0) + 1, "bias": jnp.arange(6.0) / 3},
               "batch_stats": {"mean": jnp.full((6,), 0.3), "var": jnp.full((6,), 2.0)}}
  bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5, dtype=dtype)
  grouped = GroupedBatchNorm(use_running_average=False, groups=2, momentum=0.9, epsilon=1e-5, dtype=dtype)
  assert jax.tree.structure(bn.init(jax.random.PRNGKey(0), x1)) == jax.tree.structure(grouped.init(jax.random.PRNGKey(0), x1))
  y1, s1 = bn.apply(variables, x1, mutable=["batch_stats"])
  y2, s2 = bn.apply({**variables, **s1}, x2, mutable=["batch_stats"])  # view 2 after view 1
  both = jnp.stack([x1, x2], axis=1).reshape((16, 4, 4, 6))
  y, s = grouped.apply(variables, both, mutable=["batch_stats"])
  y = y.reshape((8, 2, 4, 4, 6))
  assert y.dtype == y1.dtype
  np.testing.assert_allclose(np.asarray(y[:, 0], np.float32), np.asarray(y1, np.float32), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(y[:, 1], np.float32), np.asarray(y2, np.float32), rtol=1e-6, atol=1e-6)
  for k in ("mean", "var"):
    np.testing.assert_allclose(s["batch_stats"][k], s2["batch_stats"][k], rtol=1e-6, atol=1e-7)
  # A plain BatchNorm over the 2n rows would not be the same model.
  assert not np.allclose(np.asarray(bn.apply(variables, both, mutable=["batch_stats"])[0], np.float32).reshape(y.shape)[:, 0],
                         np.asarray(y1, np.float32), atol=1e-2)
  # Inference mode: the running averages, as BatchNorm.
  e1 = bn.clone(use_running_average=True).apply(variables, x1)
  e = grouped.clone(use_running_average=True).apply(variables, both).reshape(y.shape)
  np.testing.assert_allclose(np.asarray(e[:, 0], np.float32), np.asarray(e1, np.float32), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="not 2 equal groups"):
    grouped.apply(variables, both[:15], mutable=["batch_stats"])


@pytest.mark.parametrize("method", ["byol", "emmi"])
def test_the_fused_step_equals_a_forward_per_view(method):
  """BYOL: online, predictor and target all fused; EMMI: online and target. SGD: Adam
  would turn the float noise of a gradient that is zero in exact arithmetic (the bias of
  the projector's last layer, under a loss of centred statistics) into full-size steps."""
  config = tiny_synthetic(f"{method},runlocal", **{"optim.name": "sgd", "optim.base_lr": 0.1})
  data = sources.load(config.data, "train")
  batch = {"images": jnp.asarray(data.images[:32]), "labels": jnp.asarray(data.labels[:32])}
  results = []
  for fused in (False, True):
    with config.unlocked():
      config.model.fused_views = fused
    parts = train.build_parts(config, 10, 16, 100)
    assert (parts.views_encoder is not None) == fused
    state = init_state(parts, jax.random.PRNGKey(0))
    step = jax.jit(functools.partial(train_step, parts=parts))
    for _ in range(2):  # twice: the second step starts from trained params and statistics
      state, metrics = step(state, batch)
    results.append((jax.device_get(state), jax.device_get(metrics)))
  (separate, m_separate), (fused_state, m_fused) = results
  for a, b in zip(jax.tree.leaves(separate), jax.tree.leaves(fused_state)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-4, atol=2e-5)
  for name in ("loss", "grad_norm", "probe_loss"):
    np.testing.assert_allclose(m_separate[name], m_fused[name], rtol=2e-4, err_msg=name)
