"""Seed 002's experiments on vectors: the Gaussian mixture and its exact view MI, the MLP
encoder, the canonical SDMI prototype's alternating updates, and the ablation variants."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from emim import objectives as O
from emim import optim, train
from emim.config_base import ConfigError
from emim.data import mixture, sources
from emim.methods import Views, make_method
from emim.metric_writer import read_metrics
from emim.train_step import init_state, train_step


def test_views_mi_matches_the_closed_form_of_one_gaussian():
  # One cluster: per coordinate I = -1/2 log(1 - rho^2), rho^2 = b^2 / (a1 a2).
  s, n1, n2, dim = 1.0, 0.5, 1.5, 8
  a1, a2, b = s * s + n1 * n1, s * s + n2 * n2, s * s
  exact = -0.5 * dim * math.log(1 - b * b / (a1 * a2))
  mi, stderr = mixture.views_mutual_information(1, dim, 0.0, s, (n1, n2), samples=60_000)
  assert abs(mi - exact) < 4 * stderr + 1e-3
  # Separated clusters add at most log K, nearly all of it.
  mixed, _ = mixture.views_mutual_information(10, dim, 5.0, s, (n1, n2), samples=20_000)
  assert exact + 0.9 * math.log(10) < mixed < exact + math.log(10) + 0.05


def test_the_mixture_and_its_vector_views():
  config = tiny_config("gaussian_mixture")
  train_set, test_set = sources.load(config.data, "train"), sources.load(config.data, "test")
  assert train_set.vectors.shape == (config.data.num_train, config.data.dim) and train_set.vectors.dtype == np.float32
  assert train_set.class_names == test_set.class_names == tuple(f"cluster_{i}" for i in range(10))
  # Both splits around the same means: each point nearest its own cluster's mean mostly.
  means = mixture.cluster_means(10, config.data.dim, config.data.separation)
  nearest = np.argmin(((test_set.vectors[:, None] - means[None]) ** 2).sum(-1), axis=1)
  assert np.mean(nearest == test_set.labels) > 0.7
  from emim.data.augment import augment_vectors
  from ml_collections import ConfigDict

  x = jnp.ones((2000, 16))
  noisy = augment_vectors(jax.random.PRNGKey(0), x, ConfigDict(dict(noise_std=0.5, mask_p=0.25)))
  zeroed = np.asarray(noisy) == 0.0
  assert abs(zeroed.mean() - 0.25) < 0.01
  assert np.std(np.asarray(noisy)[~zeroed] - 1.0) == pytest.approx(0.5, rel=0.02)


def _tiny_sdmi(variant="sdmi,runlocal", **overrides):
  config = tiny_config("gaussian_mixture", variant, **overrides)
  data = sources.load(config.data, "train")
  parts = train.build_parts(config, 10, len(data) // config.train.batch_size, 100)
  state = jax.jit(functools.partial(init_state, parts))(jax.random.PRNGKey(0))
  batch = {"vectors": jnp.asarray(data.vectors[: config.train.batch_size]),
           "labels": jnp.asarray(data.labels[: config.train.batch_size])}
  return parts, state, batch


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _same(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(_leaves(a), _leaves(b), strict=True))


def test_sdmi_alternates_each_phase_leaving_the_other_branch_bitwise_unchanged():
  parts, state, batch = _tiny_sdmi(**{"method.alternate_every": 2})
  assert parts.method.target_update == "alternating" and parts.target_tx is not None
  step = jax.jit(functools.partial(train_step, parts=parts))
  phases = []
  for i in range(4):  # E, E, M, M
    new, metrics = step(state, batch)
    assert float(metrics["finite"]) == 1.0
    online_moved = not _same(state.params, new.params)
    target_moved = not _same(state.target["params"], new.target["params"])
    if i < 2:  # E-step: the target, its statistics and its optimiser untouched
      assert online_moved and not target_moved
      assert _same(state.target, new.target) and _same(state.target_opt_state, new.target_opt_state)
    else:  # M-step: the online branch (and predictor), its statistics and optimiser untouched
      assert target_moved and not online_moved
      assert _same(state.params, new.params) and _same(state.batch_stats, new.batch_stats)
      assert _same(state.opt_state, new.opt_state)
    phases.append(float(metrics["target_phase"]))
    state = new
  assert phases == [0.0, 0.0, 1.0, 1.0]


def test_each_branch_follows_the_run_schedule_at_its_own_steps():
  lr = lambda step: step * 1.0  # the global step itself
  online, target = optim.branch_schedule(lr, 2, 0), optim.branch_schedule(lr, 2, 1)
  assert [online(c) for c in range(5)] == [0, 1, 4, 5, 8]
  assert [target(c) for c in range(5)] == [2, 3, 6, 7, 10]


def test_sdmi_no_stop_gradient_moves_both_branches_in_one_step():
  parts, state, batch = _tiny_sdmi("sdmi,no_stop_gradient,runlocal")
  assert parts.method.target_update == "joint"
  new, _ = jax.jit(functools.partial(train_step, parts=parts))(state, batch)
  assert not _same(state.params, new.params) and not _same(state.target["params"], new.target["params"])
  with pytest.raises(ConfigError, match="EMA target receives no gradient"):
    make_method(tiny_config("gaussian_mixture", "sdmi,no_stop_gradient,runlocal",
                            **{"method.target_update": "ema"}).method)


@pytest.mark.slow
def test_sdmi_resumes_exactly_and_its_tracked_mi_rises(tmp_path):
  overrides = {"train.num_steps": 120, "train.log_every": 20, "checkpoint.every_steps": 60,
               "train.batch_size": 128, "eval.mi_batch_size": 256, "optim.warmup_epochs": 0}
  config = tiny_config("gaussian_mixture", "sdmi,runlocal", **overrides)
  straight = train.run(config, str(tmp_path / "straight"))
  train.run(config, str(tmp_path / "resumed"), stop_at_step=60)
  resumed = train.run(config, str(tmp_path / "resumed"))
  assert int(resumed.state.step) == 120
  for a, b in zip(_leaves(straight.state), _leaves(resumed.state), strict=True):
    np.testing.assert_array_equal(a, b)
  rows = [r for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "eval/mi_infonce" in r]
  infonce = [r["eval/mi_infonce"] for r in rows]
  assert infonce[-1] > infonce[0] + 0.3, infonce
  # ... and so does the pair its critic scores, h(f(x_a)) against g(x_b), logged in a run. (In 120 steps the
  # prototype without the M-step's marginal term rises too; its decline takes the full schedule:
  # BENCHMARKS.md, "The SDMI prototype examined".)
  branch = [r["eval/branch_mi_infonce"] for r in rows]
  assert branch[-1] > branch[0] + 1.0 and np.all(np.diff(branch) > -0.05), branch
  # The exact MI of the views, beside the estimates, and above every lower bound of it.
  exact, _ = mixture.views_mutual_information(10, config.data.dim, config.data.separation, config.data.instance_std,
                                              (config.augment.view1.noise_std, config.augment.view2.noise_std))
  assert all(r["eval/true_mi"] == pytest.approx(exact) for r in rows)
  assert all(max(r["eval/mi_infonce"], r["eval/mi_dv"]) < exact for r in rows)


def test_ablation_variants_set_their_switch_or_say_where_they_apply():
  assert tiny_config("gaussian_mixture", "byol,no_predictor").method.predictor is False
  assert tiny_config("gaussian_mixture", "vicreg,no_regularizer").method.regularizer is False
  with pytest.raises(ConfigError, match="no_stop_gradient variant does not apply to byol: it applies to sdmi, simsiam"):
    tiny_config("gaussian_mixture", "byol,no_stop_gradient")
  with pytest.raises(ConfigError, match="no_regularizer variant does not apply to emmi: it applies to barlow_twins"):
    tiny_config("gaussian_mixture", "no_regularizer")
  with pytest.raises(ConfigError, match="Unknown config variant 'no_predictors'"):
    tiny_config("gaussian_mixture", "sdmi,no_predictors")


def _loss(variant, views):
  return make_method(tiny_config("gaussian_mixture", variant).method).loss(views, {})[0]


def test_no_regularizer_keeps_the_joint_term_alone():
  z1, z2 = (jax.random.normal(k, (64, 16)) for k in jax.random.split(jax.random.PRNGKey(1)))
  views = Views((z1, z2))
  a, b = O.standardize(z1), O.standardize(z2)
  np.testing.assert_allclose(_loss("taylor_dv,no_regularizer", views), -jnp.trace(a.T @ b / 64), rtol=1e-5)
  c = a.T @ b / 64
  np.testing.assert_allclose(_loss("barlow_twins,no_regularizer", views), jnp.sum((jnp.diagonal(c) - 1) ** 2), rtol=1e-5)
  np.testing.assert_allclose(_loss("vicreg,no_regularizer", views), 25.0 * jnp.mean((z1 - z2) ** 2), rtol=1e-5)
  cos = jnp.sum(O.l2_normalize(z1) * O.l2_normalize(z2), axis=1)
  np.testing.assert_allclose(_loss("simclr,no_regularizer", views), -jnp.mean(cos) / 0.5, rtol=1e-5)
  # ... and the full losses are not that.
  assert abs(float(_loss("taylor_dv", views)) - float(-jnp.trace(c))) > 1e-3


def test_simsiam_without_stop_gradient_sends_gradient_into_both_branches():
  z1, z2 = (jax.random.normal(k, (32, 8)) for k in jax.random.split(jax.random.PRNGKey(2)))
  p1, p2 = z2 + 0.1, z1 - 0.1

  def grad_wrt_projection(variant):
    return jax.grad(lambda z: _loss(variant, Views((z, z2), (p1, p2))))(z1)

  assert float(jnp.abs(grad_wrt_projection("simsiam")).max()) == 0.0  # z only a target under sg
  assert float(jnp.abs(grad_wrt_projection("simsiam,no_stop_gradient")).max()) > 1e-3


def test_mlp_backbone_exports_evaluates_and_loads(tmp_path):
  from emim import backbone as backbone_lib
  from emim import evaluate, export

  config = tiny_config("gaussian_mixture", "simclr,runlocal")
  train.run(config, str(tmp_path / "run"))
  results = evaluate.evaluate(config, str(tmp_path / "run"))
  assert results["step"] == 4 and "knn_top1_k20" in results and results["linear_mode"] == "features"
  _, backbone = backbone_lib.restore_backbone(tmp_path / "run", config)
  export.export_backbone(backbone, tmp_path / "export")
  assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["backbone.msgpack", "model.json"]
  _, features = export.load_backbone(tmp_path / "export")
  x = sources.load(config.data, "test").vectors[:8]
  np.testing.assert_allclose(features(x), backbone.features_fn()(x), rtol=1e-6)
  assert features(x).shape == (8, config.model.width)
  with config.unlocked():
    config.eval.probe_mode = "augmented"
  with pytest.raises(ConfigError, match="probe_mode=features"):
    evaluate.evaluate(config, str(tmp_path / "run"))


def test_class_subsets_are_refused_where_the_source_generates_its_classes(tmp_path):
  from emim.config_base import validate

  for name in ("gaussian_mixture", "synthetic"):
    config = tiny_config(name, **{"data.class_subset": "imagenet100"})
    with pytest.raises(ConfigError, match="generates its classes"):
      validate(config)
  empty = tmp_path / "classes.txt"
  empty.write_text("\n# a comment\n")
  with pytest.raises(sources.DatasetError, match="the file names no classes"):
    sources.class_subset(tiny_config("synthetic", **{"data.class_subset": str(empty)}).data)


def test_a_trace_asked_for_outside_the_run_is_clipped_or_dropped(tmp_path):
  assert (lambda p: (p.first, p.last))(train.StepProfiler((3, 20), tmp_path, 0, 4)) == (3, 4)
  assert (lambda p: (p.first, p.last))(train.StepProfiler((10, 20), tmp_path, 0, 4)) == (0, 0)
  assert (lambda p: (p.first, p.last))(train.StepProfiler((1, 3), tmp_path, 2, 4)) == (3, 3)


def _views_mi_by_scipy(config, samples=6000, seed=7):
  """I(v1; v2) of the config's mixture from scipy's Gaussian densities, independently of
  mixture.py's closed forms: the joint of (v1, v2) given the cluster is one 2*dim Gaussian."""
  from scipy.special import logsumexp
  from scipy.stats import multivariate_normal

  d, k = config.data, config.data.num_classes
  n1, n2 = config.augment.view1.noise_std, config.augment.view2.noise_std
  means = mixture.cluster_means(k, d.dim, d.separation)
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, k, samples)
  x = means[labels] + d.instance_std * rng.normal(size=(samples, d.dim))
  v1, v2 = x + n1 * rng.normal(size=x.shape), x + n2 * rng.normal(size=x.shape)
  s2, eye = d.instance_std**2, np.eye(d.dim)
  joint_cov = np.block([[(s2 + n1**2) * eye, s2 * eye], [s2 * eye, (s2 + n2**2) * eye]])
  v = np.concatenate([v1, v2], axis=1)
  log_joint = logsumexp([multivariate_normal(np.concatenate([m, m]), joint_cov).logpdf(v) for m in means], axis=0)
  log_p1 = logsumexp([multivariate_normal(m, (s2 + n1**2) * eye).logpdf(v1) for m in means], axis=0)
  log_p2 = logsumexp([multivariate_normal(m, (s2 + n2**2) * eye).logpdf(v2) for m in means], axis=0)
  pointwise = log_joint - log_p1 - log_p2 + math.log(k)  # each log-sum-exp without its prior's -log K
  return pointwise.mean(), pointwise.std() / math.sqrt(samples)


def test_both_view_models_log_their_exact_mi():
  from conftest import load_config

  point, cluster = load_config("gaussian_mixture", "sdmi"), load_config("gaussian_mixture", "sdmi,cluster_views")
  assert (point.data.instance_std, cluster.data.instance_std) == (1.0, 0.0)
  assert cluster.augment.view1.noise_std == cluster.augment.view2.noise_std == 1.0
  for config in (point, cluster):
    logged = sources.known_views_mi(config)  # what the tracker logs as eval/true_mi
    independent, stderr = _views_mi_by_scipy(config)
    assert abs(logged - independent) < 4 * stderr + 0.01, (logged, independent, stderr)
  # The cluster views share only the cluster: below log K; the point views far above it.
  assert sources.known_views_mi(cluster) < math.log(10) < sources.known_views_mi(point) - 5
  with pytest.raises(ConfigError, match="also takes the view model cluster_views"):
    load_config("gaussian_mixture", "sdmi,cluster_view")


def test_critic_pair_is_a_property_of_the_method():
  pairs = {v: make_method(tiny_config("gaussian_mixture", v).method).critic_pair for v in (
      "sdmi", "byol", "moco", "simsiam", "sdmi,no_predictor", "simsiam,no_predictor", "emmi", "taylor_dv", "simclr")}
  assert pairs == {"sdmi": ("pred", "target"), "byol": ("pred", "target"), "moco": ("pred", "target"),
                   "simsiam": ("pred", "proj"), "sdmi,no_predictor": ("proj", "target"),
                   "simsiam,no_predictor": None, "emmi": ("proj", "target"), "taylor_dv": None, "simclr": None}
  assert make_method(tiny_config("gaussian_mixture", "emmi", **{"method.target": False}).method).critic_pair is None


def _infonce_by_hand(a, b, tau=0.1):
  a, b = (np.asarray(x, np.float64) for x in (a, b))
  t = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T / tau
  log_rows = np.log(np.exp(t - t.max(1, keepdims=True)).sum(1)) + t.max(1)
  return float(np.mean(np.diagonal(t) - log_rows) + np.log(len(t)))


@pytest.mark.parametrize("variant", ["sdmi", "simsiam", "emmi", "taylor_dv"])
def test_tracker_logs_the_critics_pair_against_the_modules_applied_by_hand(variant):
  from emim.evaluators.mi_tracker import _EVAL_KEY, make_mi_tracker
  from emim.train_step import make_views

  parts, state, _ = _tiny_sdmi(f"{variant},runlocal")
  if state.target is not None:  # a target unlike the online encoder, or reading the wrong one would pass
    leaves, tree = jax.tree.flatten(state.target["params"])
    keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
    noisy = [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
    state = state.replace(target={**state.target, "params": jax.tree.unflatten(tree, noisy)})
  inputs = {"vectors": jnp.asarray(sources.load(tiny_config("gaussian_mixture").data, "train").vectors[:128])}
  logged = jax.device_get(make_mi_tracker(parts)(state, inputs))
  if variant == "taylor_dv":  # JMI: the online pair is the critic's pair, logged once
    assert "eval/mi_infonce" in logged and not any("branch" in k for k in logged)
    return
  x1, x2 = make_views(parts, jax.random.PRNGKey(_EVAL_KEY), 0, inputs)
  apply = lambda module, variables, x: module.apply(variables, x, train=False)
  online = {"params": state.params["encoder"], "batch_stats": state.batch_stats["encoder"]}
  z1, z2 = apply(parts.encoder, online, x1)[1], apply(parts.encoder, online, x2)[1]
  if variant == "emmi":  # the online projection against the target's
    a1, a2 = z1, z2
  else:  # the online branch with its predictor
    predictor = {"params": state.params["predictor"], "batch_stats": state.batch_stats["predictor"]}
    a1, a2 = apply(parts.predictor, predictor, z1), apply(parts.predictor, predictor, z2)
  if variant == "simsiam":  # no target: the shared encoder's projection
    b1, b2 = z1, z2
  else:
    b1, b2 = apply(parts.encoder, state.target, x1)[1], apply(parts.encoder, state.target, x2)[1]
  expected = 0.5 * (_infonce_by_hand(a1, b2) + _infonce_by_hand(a2, b1))
  np.testing.assert_allclose(logged["eval/branch_mi_infonce"], expected, rtol=1e-4, atol=1e-4)
  for name, estimator in (("dv", O.dv), ("jsd", O.jsd)):
    both = 0.5 * (estimator(a1, b2, 0.1) + estimator(a2, b1, 0.1))
    np.testing.assert_allclose(logged[f"eval/branch_mi_{name}"], both, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(logged["eval/branch_effective_rank_target"], O.effective_rank(b1), rtol=1e-4)
  # ... and it is not the online pair's value.
  assert abs(float(logged["eval/branch_mi_infonce"]) - float(logged["eval/mi_infonce"])) > 0.05


def test_marginal_term_puts_the_dv_bound_into_the_target_step_only():
  parts, state, batch = _tiny_sdmi(**{"method.marginal_term": "target_step", "method.critic_tau": 0.5})
  step = jax.jit(functools.partial(train_step, parts=parts))
  e_state, e_metrics = step(state, batch)  # E-step: -cos, M reported beside it
  _, m_metrics = step(e_state, batch)  # M-step: -(J - M) with the critic cos / 0.5
  np.testing.assert_allclose(e_metrics["loss"], -e_metrics["cos"], rtol=1e-6)
  np.testing.assert_allclose(m_metrics["loss"], -(m_metrics["cos"] / 0.5 - m_metrics["marginal"]), rtol=1e-5)
  assert float(m_metrics["target_phase"]) == 1.0 and abs(float(m_metrics["marginal"])) > 1e-4
  for bad, message in (({"method.marginal_term": "m_step"}, "choose one of"),
                       ({"method.target_lr_scale": 0.1, "method.target_update": "ema"}, "EMA target takes none"),
                       ({"method.target_lr_scale": 0.0}, "a positive number"),
                       ({"method.critic_tau": 0.0}, "positive temperature")):
    with pytest.raises(ConfigError, match=message):
      make_method(tiny_config("gaussian_mixture", "sdmi", **bad).method)


def test_target_lr_scale_scales_the_target_step_alone():
  updates = {}
  for scale in (1.0, 0.1):
    parts, state, _ = _tiny_sdmi(**{"method.target_lr_scale": scale})
    grads = jax.tree.map(jnp.ones_like, (state.params, state.target["params"]))
    online, _ = parts.tx.update(grads[0], state.opt_state, state.params)
    target, _ = parts.target_tx.update(grads[1], state.target_opt_state, state.target["params"])
    updates[scale] = (online, target)
  for full, tenth in zip(_leaves(updates[1.0][0]), _leaves(updates[0.1][0]), strict=True):
    np.testing.assert_array_equal(full, tenth)  # the online branch's steps are the same
  for full, tenth in zip(_leaves(updates[1.0][1]), _leaves(updates[0.1][1]), strict=True):
    np.testing.assert_allclose(tenth, 0.1 * full, rtol=1e-5)  # AdamW's step is linear in its learning rate
  assert max(np.abs(x).max() for x in _leaves(updates[1.0][1])) > 0
