"""The objective library against closed forms, references and published formulas."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import emim.objectives as O


def correlated_views(n, d, rho, seed=0):
  """z2 = rho z1 + sqrt(1 - rho^2) noise: I(z1; z2) = -d/2 log(1 - rho^2)."""
  rng = np.random.default_rng(seed)
  z1 = rng.normal(size=(n, d))
  z2 = rho * z1 + math.sqrt(1 - rho**2) * rng.normal(size=(n, d))
  return jnp.asarray(z1, jnp.float32), jnp.asarray(z2, jnp.float32)


def random_spd_factor(m, d, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(m, d)) * scale
  x = x - x.mean(0)
  return jnp.asarray(x / math.sqrt(m), jnp.float32)


# ----------------------------------------------------------------------------------
# Gaussian MI.
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["joint", "symmetric"])
def test_gaussian_mi_matches_closed_form(form):
  n, d, rho = 20000, 8, 0.7
  z1, z2 = correlated_views(n, d, rho)
  truth = -d / 2 * math.log(1 - rho**2)
  # The plug-in estimator's bias is about d^2 / (2n) nats here; its sd about sqrt(d/n).
  assert abs(float(O.gaussian_mi(z1, z2, form=form)) - truth) < 0.05 * truth


def test_gaussian_mi_invariant_to_invertible_linear_maps():
  z1, z2 = correlated_views(4000, 6, 0.5, seed=1)
  rng = np.random.default_rng(2)
  a = jnp.asarray(rng.normal(size=(6, 6)) + 3 * np.eye(6), jnp.float32)
  b = jnp.asarray(rng.normal(size=(6, 6)) + 3 * np.eye(6), jnp.float32)
  base = O.gaussian_mi(z1, z2)
  np.testing.assert_allclose(O.gaussian_mi(z1 @ a, z2), base, rtol=1e-4)
  np.testing.assert_allclose(O.gaussian_mi(z1 @ a + 5.0, z2 @ b - 2.0), base, rtol=1e-4)
  # And MI of independent views is ~0.
  noise = jnp.asarray(rng.normal(size=(4000, 6)), jnp.float32)
  assert abs(float(O.gaussian_mi(z1, noise))) < 0.02


def test_sample_logdet_bias_matches_monte_carlo():
  # E[ld(S_hat)] - ld(Sigma) for Gaussian samples, against an average over draws.
  n, d = 40, 12
  rng = np.random.default_rng(30)
  sigma = np.diag(np.linspace(0.5, 3.0, d))
  draws = []
  for _ in range(2000):
    x = rng.multivariate_normal(np.zeros(d), sigma, size=n)
    draws.append(np.linalg.slogdet(np.cov(x.T, bias=True))[1])
  expected = np.mean(draws) - np.linalg.slogdet(sigma)[1]
  assert abs(O.sample_logdet_bias(d, n) - expected) < 0.05
  with pytest.raises(ValueError, match="more samples than dimensions"):
    O.sample_logdet_bias(40, 40)


def test_debiased_gaussian_mi_is_unbiased_where_the_plug_in_is_not():
  # n = 5d: the plug-in estimate is ~d^2 / (2n) = 3.2 nats too high.
  n, d, rho = 160, 32, 0.5
  truth = -d / 2 * math.log(1 - rho**2)
  plug_in, debiased = [], []
  for seed in range(8):
    z1, z2 = correlated_views(n, d, rho, seed=100 + seed)
    plug_in.append(float(O.gaussian_mi(z1, z2)))
    debiased.append(float(O.gaussian_mi(z1, z2, debias=True)))
  assert np.mean(plug_in) - truth > 2.0
  assert abs(np.mean(debiased) - truth) < 0.3
  with pytest.raises(ValueError, match="n > 2d"):
    O.gaussian_mi(*correlated_views(64, 32, rho), debias=True)
  with pytest.raises(ValueError, match="form='joint'"):
    O.gaussian_mi(*correlated_views(n, d, rho), form="symmetric", debias=True)


def test_principal_gaussian_mi_reads_zero_for_independent_views_and_the_subspace_mi():
  # Two independent 128-dimensional views from 512 samples: the plug-in Gaussian MI reads
  # ~20 nats; the debiased MI of the 16 leading directions reads ~0.
  rng = np.random.default_rng(31)
  a, b = (jnp.asarray(rng.normal(size=(512, 128)), jnp.float32) for _ in range(2))
  assert float(O.gaussian_mi(O.standardize(a), O.standardize(b), eps=1e-3)) > 15.0
  assert abs(float(O.principal_gaussian_mi(a, b))) < 0.5
  # Isotropic correlation: any k directions shared by both views hold -k/2 log(1 - rho^2).
  # (Choosing the directions on the rows that measure them reads over a third more here.)
  z1, z2 = correlated_views(2048, 128, 0.5, seed=32)
  np.testing.assert_allclose(O.principal_gaussian_mi(z1, z2, dims=32), -16 * math.log(1 - 0.25), rtol=0.1)
  # Per-dimension scale does not matter; too few samples for the subspace is refused.
  scale = jnp.asarray(rng.uniform(0.1, 10.0, size=128), jnp.float32)
  np.testing.assert_allclose(O.principal_gaussian_mi(z1 * scale, z2, dims=32), O.principal_gaussian_mi(z1, z2, dims=32),
                             rtol=1e-3)
  with pytest.raises(ValueError, match="n / 2 > 2 dims"):
    O.principal_gaussian_mi(z1[:128], z2[:128], dims=32)


def test_symmetric_form_equals_joint_form_on_symmetrised_statistics():
  rng = np.random.default_rng(3)
  z1 = jnp.asarray(rng.normal(size=(500, 5)), jnp.float32)
  z2 = 0.6 * z1 @ jnp.asarray(rng.normal(size=(5, 5)), jnp.float32) + jnp.asarray(rng.normal(size=(500, 5)), jnp.float32)
  s11, s22, s12 = O.covariance(z1), O.covariance(z2), O.covariance(z1, z2)
  s, c = (s11 + s22) / 2, (s12 + s12.T) / 2
  joint_of_symmetrised = O.gaussian_mi_from_covariances(s, c, s)
  np.testing.assert_allclose(O.gaussian_mi(z1, z2, form="symmetric"), joint_of_symmetrised, rtol=1e-4)
  # And the joint form of the raw statistics is what gaussian_mi's joint form computes.
  np.testing.assert_allclose(O.gaussian_mi(z1, z2, form="joint"), O.gaussian_mi_from_covariances(s11, s12, s22), rtol=1e-4)


# ----------------------------------------------------------------------------------
# Log-determinant backends.
# ----------------------------------------------------------------------------------
def test_exact_backends_agree_and_gram_form_equals_direct():
  for m, d in [(64, 16), (16, 64)]:
    x = random_spd_factor(m, d, seed=m)
    a = x.T @ x + 1e-3 * jnp.eye(d)
    reference = float(np.linalg.slogdet(np.asarray(a, np.float64))[1])
    for backend in ["cholesky", "eigh"]:
      for gram in [False, "auto"]:
        cfg = O.LogdetConfig(backend=backend, eps=1e-3, gram=gram)
        value = O.covariance_logdet(x, cfg)[0]
        np.testing.assert_allclose(value, reference, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5, 6])
def test_taylor_equals_polynomial_on_eigh_spectrum_value_and_gradient(order):
  x = random_spd_factor(48, 12, seed=order)
  eps, beta = 1e-3, 2.0

  def taylor(x):
    a = x.T @ x + eps * jnp.eye(12)
    return O.taylor_logdet(a, beta, order)

  def polynomial_on_eigenvalues(x):
    lam = jnp.linalg.eigvalsh(x.T @ x + eps * jnp.eye(12))
    return 12 * jnp.log(beta) + jnp.sum(O.taylor_log(lam / beta, order))

  np.testing.assert_allclose(taylor(x), polynomial_on_eigenvalues(x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.grad(taylor)(x), jax.grad(polynomial_on_eigenvalues)(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rescale", ["trace", "max_eig"])
def test_taylor_gram_form_equals_direct(rescale):
  x = random_spd_factor(10, 40, seed=5)
  direct = O.LogdetConfig(backend="taylor", eps=0.05, order=4, rescale=rescale, gram=False)
  gram = O.LogdetConfig(backend="taylor", eps=0.05, order=4, rescale=rescale, gram=True)
  state = O.init_eig_state(40)
  v_direct, _, d1 = O.covariance_logdet(x, direct, state)
  v_gram, _, d2 = O.covariance_logdet(x, gram, state)
  np.testing.assert_allclose(v_gram, v_direct, rtol=1e-5)
  np.testing.assert_allclose(d1["beta"], d2["beta"], rtol=1e-6)
  g_direct = jax.grad(lambda x: O.covariance_logdet(x, direct, state)[0])(x)
  g_gram = jax.grad(lambda x: O.covariance_logdet(x, gram, state)[0])(x)
  np.testing.assert_allclose(g_gram, g_direct, rtol=1e-4, atol=1e-6)


def test_taylor_approaches_exact_logdet_as_order_grows():
  # Spectrum of A / beta inside (0.3, 1]: well inside the convergence region (0, 2).
  rng = np.random.default_rng(7)
  q, _ = np.linalg.qr(rng.normal(size=(10, 10)))
  lam = np.linspace(0.3, 1.0, 10)
  a = jnp.asarray(q @ np.diag(lam) @ q.T, jnp.float32)
  exact = float(np.sum(np.log(lam)))
  errors = [abs(float(O.taylor_logdet(a, 1.0, k)) - exact) for k in (1, 2, 4, 8, 16, 32)]
  assert all(e2 < e1 for e1, e2 in zip(errors, errors[1:])), errors
  assert errors[-1] < 1e-4


def test_power_iteration_tracks_lambda_max_and_rescaling_keeps_spectrum_in_range():
  x = random_spd_factor(200, 16, seed=8, scale=3.0)
  truth = float(np.linalg.eigvalsh(np.asarray(x.T @ x, np.float64))[-1]) + 1e-3
  lam, _ = O.power_iteration(x, 1e-3, O.init_eig_state(16)["v"], 200)
  np.testing.assert_allclose(lam, truth, rtol=1e-4)
  cfg = O.LogdetConfig(backend="taylor", eps=1e-3, rescale="max_eig", power_iters=3)
  state = O.init_eig_state(16)
  step = jax.jit(lambda s: O.covariance_logdet(x, cfg, s)[1:])
  for _ in range(80):  # warm-started across "steps"; the EMA forgets its start
    state, diag = step(state)
  np.testing.assert_allclose(state["lam"], truth, rtol=1e-3)
  assert 0.0 < float(diag["rescaled_eig_max"]) <= 1.0 + 1e-5


def test_config_rejects_unknown_backend_and_unsafe_rescaling():
  with pytest.raises(ValueError, match="backend"):
    O.LogdetConfig(backend="svd")
  with pytest.raises(ValueError, match="convergence region"):
    O.LogdetConfig(rescale_c=0.4)
  with pytest.raises(ValueError, match="form"):
    O.EmmiConfig(form="asymmetric")


# ----------------------------------------------------------------------------------
# The EMMI loss.
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["joint", "symmetric"])
def test_emmi_loss_with_exact_backend_is_minus_gaussian_mi(form):
  z1, z2 = correlated_views(256, 8, 0.5, seed=9)
  cfg = O.EmmiConfig(form=form, logdet=O.LogdetConfig(backend="cholesky", eps=1e-4))
  loss, state, metrics = O.emmi_loss(z1, z2, O.init_emmi_state(8, cfg), cfg)
  np.testing.assert_allclose(-loss, O.gaussian_mi(z1, z2, form=form, eps=1e-4), rtol=1e-4)
  np.testing.assert_allclose(metrics["mi"], -loss, rtol=1e-6)
  assert state == {}


def test_emmi_effective_rank_metric_is_scale_free_even_at_a_drifted_scale():
  """rank_renyi2 = tr(S)^2 / tr(S^2): 1 for a rank-1 embedding, near d for isotropic ones,
  and the same number at a scale of 1e12, where tr(S^2) alone overflows float32 (a
  diverging CIFAR run logged NaN for it)."""
  cfg = O.EmmiConfig()
  rank = lambda a, b: float(O.emmi_loss(a, b, O.init_emmi_state(8, cfg), cfg)[2]["rank_renyi2"])
  z1, z2 = (jnp.asarray(z, jnp.float32) for z in correlated_views(4096, 8, 0.5, seed=3))
  assert 7.5 < rank(z1, z2) <= 8.0
  np.testing.assert_allclose(rank(1e12 * z1, 1e12 * z2), rank(z1, z2), rtol=1e-4)
  line = jnp.outer(z1[:, 0], jnp.ones(8))
  np.testing.assert_allclose(rank(line, 2.0 * line), 1.0, rtol=1e-5)


def test_emmi_weight_on_invariance_terms():
  z1, z2 = correlated_views(128, 4, 0.5, seed=10)
  base = O.EmmiConfig(logdet=O.LogdetConfig(backend="cholesky"))
  weighted = O.EmmiConfig(logdet=O.LogdetConfig(backend="cholesky"), w_inv=2.0)
  _, _, m = O.emmi_loss(z1, z2, {}, base)
  loss2, _, _ = O.emmi_loss(z1, z2, {}, weighted)
  expected = -(m["ld_marginal"] - 2.0 * 0.5 * (m["ld_sum"] + m["ld_diff"]))
  np.testing.assert_allclose(loss2, expected, rtol=1e-5)


def test_gradients_finite_for_rank_deficient_and_bf16_inputs():
  rng = np.random.default_rng(11)
  base = rng.normal(size=(4, 32))
  z1 = jnp.asarray(np.repeat(base, 4, axis=0), jnp.float32)  # n=16 < d=32, duplicated rows
  z2 = z1 + 0.01 * jnp.asarray(rng.normal(size=z1.shape), jnp.float32)
  for backend in ["cholesky", "taylor"]:
    for form in ["joint", "symmetric"]:
      cfg = O.EmmiConfig(form=form, logdet=O.LogdetConfig(backend=backend, eps=1e-4))
      state = O.init_emmi_state(32, cfg)
      for dtype in [jnp.float32, jnp.bfloat16]:
        grads = jax.grad(lambda a, b: O.emmi_loss(a, b, state, cfg)[0], argnums=(0, 1))(
            z1.astype(dtype), z2.astype(dtype))
        for g in grads:
          assert np.all(np.isfinite(np.asarray(g, np.float32))), (backend, form, dtype)
  # Fully collapsed views: every covariance is the ridge alone.
  const = jnp.ones((16, 32))
  cfg = O.EmmiConfig()
  g = jax.grad(lambda a: O.emmi_loss(a, const, O.init_emmi_state(32, cfg), cfg)[0])(const)
  assert np.all(np.isfinite(g))


# ----------------------------------------------------------------------------------
# MI estimators and the established losses on hand-checked examples.
# ----------------------------------------------------------------------------------
def test_estimators_on_hand_checked_example():
  # Two pairs, orthogonal embeddings, tau = 1: T = [[1, 0], [0, 1]].
  za = jnp.array([[1.0, 0.0], [0.0, 2.0]])
  zb = jnp.array([[3.0, 0.0], [0.0, 0.5]])
  # DV: mean diag = 1; log mean_{i != j} exp(0) = 0.
  np.testing.assert_allclose(O.dv(za, zb), 1.0, rtol=1e-6)
  # InfoNCE: 1 - log((e + 1)/2).
  np.testing.assert_allclose(O.infonce(za, zb), 1.0 - math.log((math.e + 1) / 2), rtol=1e-6)
  # JSD: -softplus(-1) - softplus(0).
  sp = lambda x: math.log1p(math.exp(x))
  np.testing.assert_allclose(O.jsd(za, zb), -sp(-1.0) - sp(0.0), rtol=1e-6)
  # InfoNCE is bounded by log n.
  z1, z2 = correlated_views(64, 16, 0.99)
  assert float(O.infonce(z1, z2, tau=0.05)) <= math.log(64) + 1e-5


def test_nt_xent_hand_checked():
  # n = 2, tau = 1, z1 = [e1, e2], z2 = [e1, e2]: each anchor's positive has cos 1, the two
  # others cos 0: loss = -log(e / (e + 2)).
  e = jnp.eye(2)
  loss, _ = O.nt_xent(e, e, tau=1.0)
  np.testing.assert_allclose(loss, -math.log(math.e / (math.e + 2)), rtol=1e-6)


def test_barlow_twins_hand_checked():
  # Standardised columns: z1 = [[1, 1], [-1, -1]] -> C = [[1, 1], [1, 1]] with z2 = z1
  # (up to the 1e-5 BatchNorm eps): on-diagonal 0, off-diagonal 2 * 1^2 = 2.
  z = jnp.array([[1.0, 1.0], [-1.0, -1.0]])
  loss, m = O.barlow_twins(z, z, lambd=0.5)
  np.testing.assert_allclose(m["bt_on_diag"], 0.0, atol=1e-4)
  np.testing.assert_allclose(m["bt_off_diag"], 2.0, rtol=1e-4)
  np.testing.assert_allclose(loss, 1.0, rtol=1e-4)
  # Anti-correlated views: C = -I on the diagonal -> (1 - (-1))^2 per dimension.
  loss, m = O.barlow_twins(jnp.array([[1.0, -1.0], [-1.0, 1.0]]), jnp.array([[-1.0, 1.0], [1.0, -1.0]]), lambd=0.0)
  np.testing.assert_allclose(loss, 8.0, rtol=1e-4)


def test_vicreg_hand_checked():
  # z1 = [[1, 0], [-1, 0]], z2 = z1 + 1: invariance = mean((-1)^2) = 1.
  # Column stds (unbiased, n=2): sqrt(2) and 0 -> hinge terms 0 and 1 -> mean 0.5, /2 per branch.
  # Off-diagonal covariance is 0.
  z1 = jnp.array([[1.0, 0.0], [-1.0, 0.0]])
  z2 = z1 + 1.0
  loss, m = O.vicreg(z1, z2, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, eps=0.0)
  np.testing.assert_allclose(m["vic_invariance"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(m["vic_variance"], 0.5, rtol=1e-6)
  np.testing.assert_allclose(m["vic_covariance"], 0.0, atol=1e-7)
  np.testing.assert_allclose(loss, 25.0 + 12.5, rtol=1e-6)


def test_taylor_dv_hand_checked():
  # Standardised a = b = [[1, 1], [-1, -1]]: Sab = Saa = Sbb = [[1, 1], [1, 1]] (to eps).
  # -tr(Sab) = -2, 1/2 tr(Saa Sbb) = 1/2 * 4 = 2.
  z = jnp.array([[1.0, 1.0], [-1.0, -1.0]])
  loss, m = O.taylor_dv(z, z, lambd=1.0)
  np.testing.assert_allclose(m["dv_joint"], 2.0, rtol=1e-4)
  np.testing.assert_allclose(m["dv_marginal"], 2.0, rtol=1e-4)
  np.testing.assert_allclose(loss, 0.0, atol=1e-3)


def test_sdmi_losses_hand_checked_and_stop_gradient():
  p = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  t = jnp.array([[2.0, 0.0], [1.0, 0.0]])  # cos = 1 and 0
  np.testing.assert_allclose(O.byol_loss(p, t)[0], 1.0, rtol=1e-6)  # mean(2 - 2*[1, 0])
  np.testing.assert_allclose(O.sdmi_prototype_loss(p, t)[0], -0.5, rtol=1e-6)
  np.testing.assert_allclose(O.simsiam_loss(p, t)[0], -0.5, rtol=1e-6)
  for loss_fn in [O.byol_loss, O.sdmi_prototype_loss]:
    g_target = jax.grad(lambda t: loss_fn(p, t)[0])(t)
    np.testing.assert_array_equal(g_target, 0.0)  # the target receives no gradient
  # MoCo: q = k = I, tau = 1: CE = -log(e / (e + 1)).
  loss, m = O.moco_infonce(jnp.eye(2), jnp.eye(2), tau=1.0)
  np.testing.assert_allclose(loss, -math.log(math.e / (math.e + 1)), rtol=1e-6)
  assert float(m["moco_acc"]) == 1.0


def test_sdmi_dv_loss_is_the_dv_bound_hand_checked():
  # p = t = I (n = 2, cos = 1 matched, 0 unmatched), tau = 0.5: J = 2, M = log mean(e^0) = 0.
  loss, m = O.sdmi_dv_loss(jnp.eye(2), 3.0 * jnp.eye(2), tau=0.5)
  np.testing.assert_allclose(loss, -2.0, rtol=1e-6)
  np.testing.assert_allclose(m["marginal"], 0.0, atol=1e-6)
  # Any batch: the value of the tracked DV estimate, negated; M = log mean_{i != j} exp T_ij.
  p, t = (jax.random.normal(k, (16, 8)) for k in jax.random.split(jax.random.PRNGKey(3)))
  loss, m = O.sdmi_dv_loss(p, t, tau=0.2)
  np.testing.assert_allclose(loss, -O.dv(p, t, tau=0.2), rtol=1e-5)
  cos = np.asarray(O.l2_normalize(p) @ O.l2_normalize(t).T, np.float64)
  off = cos[~np.eye(16, dtype=bool)] / 0.2
  np.testing.assert_allclose(m["marginal"], np.log(np.mean(np.exp(off))), rtol=1e-5)
  np.testing.assert_allclose(m["cos"], np.mean(np.diagonal(cos)), rtol=1e-5)
  # Unlike the prototype's -cos it reaches the target (the alternating M-step trains it), unless stopped.
  assert float(jnp.abs(jax.grad(lambda t: O.sdmi_dv_loss(p, t)[0])(t)).max()) > 1e-3
  np.testing.assert_array_equal(jax.grad(lambda t: O.sdmi_dv_loss(p, t, stop_gradient=True)[0])(t), 0.0)


def test_diagnostics():
  z1, _ = correlated_views(2000, 8, 0.5)
  np.testing.assert_allclose(O.effective_rank(z1), 8.0, rtol=0.02)
  assert 7.0 < float(O.renyi2_rank(z1)) <= float(O.effective_rank(z1)) + 1e-4
  collapsed = jnp.ones((32, 8)) + 1e-6 * z1[:32]
  assert float(O.embedding_std(collapsed)) < 1e-4
  spectrum = O.rescaled_spectrum(z1, z1, eps=1e-4)
  np.testing.assert_allclose(spectrum["rescaled_eig_max_marginal"], 1.0, rtol=1e-6)


# ----------------------------------------------------------------------------------
# Sharded over 8 devices: statistics over the global batch.
# ----------------------------------------------------------------------------------
def _all_losses(z1, z2):
  emmi = O.EmmiConfig()
  joint = O.EmmiConfig(form="joint", logdet=O.LogdetConfig(backend="cholesky"))
  state = O.init_emmi_state(z1.shape[1], emmi)
  return {
      "emmi": O.emmi_loss(z1, z2, state, emmi)[0],
      "emmi_joint": O.emmi_loss(z1, z2, {}, joint)[0],
      "gaussian_sym": O.gaussian_mi(z1, z2, form="symmetric", eps=1e-4),
      "dv": O.dv(z1, z2, 0.5),
      "infonce": O.infonce(z1, z2, 0.5),
      "jsd": O.jsd(z1, z2, 0.5),
      "nt_xent": O.nt_xent(z1, z2)[0],
      "barlow": O.barlow_twins(z1, z2)[0],
      "vicreg": O.vicreg(z1, z2)[0],
      "taylor_dv": O.taylor_dv(z1, z2)[0],
      "byol": O.byol_loss(z1, z2)[0],
      "moco": O.moco_infonce(z1, z2)[0],
      "renyi2_rank": O.renyi2_rank(z1),
  }


def test_every_loss_sharded_over_8_devices_equals_unsharded():
  assert jax.device_count() == 8, "conftest sets 8 host devices"
  z1, z2 = correlated_views(64, 16, 0.6, seed=12)
  unsharded = jax.jit(_all_losses)(z1, z2)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  batch = NamedSharding(mesh, P("data"))
  s1, s2 = jax.device_put(z1, batch), jax.device_put(z2, batch)
  assert len(s1.sharding.device_set) == 8
  sharded = jax.jit(_all_losses)(s1, s2)
  for name in unsharded:
    np.testing.assert_allclose(sharded[name], unsharded[name], rtol=2e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("backend", ["cholesky", "taylor"])
def test_covariance_smoothing_blends_running_and_batch_statistics(backend):
  lam, eps = 0.25, 1e-3
  cfg = O.EmmiConfig(logdet=O.LogdetConfig(backend=backend, eps=eps, rescale="trace"), smoothing=lam)
  plain = O.EmmiConfig(logdet=O.LogdetConfig(backend=backend, eps=eps, rescale="trace"))
  a1, b1 = correlated_views(64, 6, 0.5, seed=20)
  a2, b2 = correlated_views(64, 6, 0.5, seed=21)
  state = O.init_emmi_state(6, cfg)
  # The first batch has no history: exactly the unsmoothed loss.
  loss1, state, _ = O.emmi_loss(a1, b1, state, cfg)
  np.testing.assert_allclose(loss1, O.emmi_loss(a1, b1, {}, plain)[0], rtol=1e-5)
  # Then R = lam R_prev + (1 - lam) R_batch for each statistic.
  _, state2, metrics = O.emmi_loss(a2, b2, state, cfg)
  x1 = O.covariance_factors(a1, b1, "symmetric")["diff"]
  x2 = O.covariance_factors(a2, b2, "symmetric")["diff"]
  blended = lam * x1.T @ x1 + (1 - lam) * x2.T @ x2
  expected = O.matrix_logdet(blended, cfg.logdet)[0]
  np.testing.assert_allclose(metrics["ld_diff"], expected, rtol=1e-5)
  np.testing.assert_allclose(state2["diff"]["cov"], blended, rtol=1e-5)
  # The history carries no gradient: only the batch part, scaled by (1 - lam).
  g = jax.grad(lambda a: O.emmi_loss(a, b2, state, cfg)[0])(a2)
  assert np.all(np.isfinite(g)) and float(jnp.abs(g).sum()) > 0
  with pytest.raises(ValueError, match="smoothing"):
    O.EmmiConfig(smoothing=1.0)


def test_matrix_logdet_equals_factor_logdet():
  x = random_spd_factor(40, 8, seed=22)
  for backend in ["cholesky", "eigh", "taylor"]:
    cfg = O.LogdetConfig(backend=backend, eps=1e-3, gram=False)
    state = O.init_eig_state(8)
    v1, s1, _ = O.covariance_logdet(x, cfg, state)
    v2, s2, _ = O.matrix_logdet(x.T @ x, cfg, state)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    # The tracked eigenvalue state (Taylor's lambda_max and its power-iteration vector)
    # moves alike from the factor and from the matrix.
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    if backend == "taylor":
      assert not np.allclose(jax.tree.leaves(s1)[0], jax.tree.leaves(state)[0])  # it did move


def test_mi_estimates_are_finite_on_rank_deficient_batches_and_scale_free():
  z1, z2 = correlated_views(4000, 4, 0.7, seed=23)
  est = O.mi_estimates(z1, z2 * 50.0, tau=0.5)  # per-dimension scale does not matter
  np.testing.assert_allclose(est["mi_gaussian"], -2 * math.log(1 - 0.7**2), rtol=0.05)
  assert float(est["mi_infonce"]) > 0.0 and float(est["mi_dv"]) > 0.0
  w1, w2 = correlated_views(16, 64, 0.7, seed=24)  # n = 16 < 2d = 128: rank-deficient
  assert all(np.isfinite(float(v)) for v in O.mi_estimates(w1, w2).values())
