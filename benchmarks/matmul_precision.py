"""What one bfloat16 pass per matrix product does to each of emim's statistics (issue 19).

    python -m emim.main --config=configs/synthetic.py --workdir=/tmp/emim_syn300 --config.train.num_steps=300
    python benchmarks/matmul_precision.py --workdir=/tmp/emim_syn300

On a TPU a float32 matrix product at JAX's default precision runs as one bfloat16 pass
(each operand rounded to bfloat16, products summed in float32); on a GPU as TF32. This
replays that on the CPU, where every product is exact float32: each product at default
precision gets its operands rounded to bfloat16 first (``one_bf16_pass``), then the
statistic is compared with float32 (the CPU as it is) and float64 (numpy, computed
independently) on the embeddings of a trained run: two augmented views of a fixed batch
through the online encoder, and the backbone's features of train and test subsets for
the kNN. A product the code marks ``precision=HIGHEST`` (or runs under
``jax.default_matmul_precision("highest")``) is left exact, as a TPU runs it (six
bfloat16 passes, float32 accuracy): the ``bf16 pass, as shipped`` column shows what the
code does now, ``bf16 pass everywhere`` what it would do without the setting.
"""

from __future__ import annotations

import argparse
import contextlib
import types

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import config as jax_config
from jax._src.lax import lax as lax_internal

from emim import checkpoint as ckpt_lib
from emim import objectives as O
from emim import train
from emim.backbone import load_run_config
from emim.data import augment, sources
from emim.evaluators.knn import _knn_chunk
from emim.evaluators.mi_tracker import online_embeddings
from emim.objectives import logdet as ld_lib
from emim.train_step import make_views

_ORIGINAL_DOT = lax_internal.dot_general
_FULL = ("highest", "float32")


def _is_default(precision) -> bool:
  """Whether a product of this precision (None: the scoped default) is one bf16 pass on a TPU."""
  if precision is None:
    precision = jax_config.default_matmul_precision.value
  if isinstance(precision, (tuple, list)):
    return any(_is_default(p) for p in precision)
  return precision is None or (precision != jax.lax.Precision.HIGHEST and str(precision).lower() not in _FULL)


@contextlib.contextmanager
def one_bf16_pass(override: bool = False):
  """Every float32 matrix product at default precision as a TPU runs it: operands rounded
  to bfloat16, products summed in float32 (``override``: every product, whatever its
  precision). Patches ``lax.dot_general``, which jnp.matmul and ``@`` (and their
  transposes in gradients) call; only for code traced inside."""

  def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    if lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32 and (override or _is_default(precision)):
      lhs, rhs = lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16)
      return _ORIGINAL_DOT(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=jnp.float32, **kw)
    return _ORIGINAL_DOT(lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type,
                         **kw)

  lax_internal.dot_general = dot_general
  try:
    yield
  finally:
    lax_internal.dot_general = _ORIGINAL_DOT


def three_ways(fn, *args):
  """fn(*args) in float32, with one bf16 pass where the code leaves default precision, and
  with one bf16 pass for every product; each traced afresh (no jit cache shared)."""
  def run():
    jax.clear_caches()  # jnp.matmul's own trace is cached, and the patch is not part of its key
    return jax.tree.map(np.asarray, jax.jit(lambda *a: fn(*a))(*args))

  f32 = run()
  with one_bf16_pass():
    shipped = run()
  with one_bf16_pass(override=True):
    everywhere = run()
  return f32, shipped, everywhere


# ----------------------------------------------------------------------------------
# float64 references, computed with numpy.
# ----------------------------------------------------------------------------------
def _symmetric_factors64(z1, z2):
  c1, c2 = z1 - z1.mean(0), z2 - z2.mean(0)
  n = len(z1)
  return {"marginal": np.concatenate([c1, c2]) / np.sqrt(2 * n), "sum": (c1 + c2) / np.sqrt(2 * n),
          "diff": (c1 - c2) / np.sqrt(2 * n)}


def _logdet64(x, eps):
  return np.linalg.slogdet(x.T @ x + eps * np.eye(x.shape[1]))[1]


def _taylor64(a, beta, order):
  m = a / beta - np.eye(len(a))
  ev = np.linalg.eigvalsh(m)
  return len(a) * np.log(beta) + sum((-1) ** (k + 1) / k * np.sum(ev ** k) for k in range(1, order + 1))


def _critics64(za, zb, tau):
  za, zb = za / np.linalg.norm(za, axis=1, keepdims=True), zb / np.linalg.norm(zb, axis=1, keepdims=True)
  t = za @ zb.T / tau
  n = len(t)
  off = ~np.eye(n, dtype=bool)
  lse = lambda v: v.max() + np.log(np.sum(np.exp(v - v.max())))
  softplus = lambda v: np.logaddexp(0, v)
  dv = np.mean(np.diag(t)) - (lse(t[off]) - np.log(n * (n - 1)))
  infonce = np.mean(np.diag(t) - np.array([lse(r) for r in t])) + np.log(n)
  jsd = np.mean(-softplus(-np.diag(t))) - np.sum(np.where(off, softplus(t), 0)) / (n * (n - 1))
  return {"mi_dv": dv, "mi_infonce": infonce, "mi_jsd": jsd}


def _knn64(train_f, train_l, test_f, test_l, num_classes, ks, temperature):
  nrm = lambda f: f / np.linalg.norm(f, axis=1, keepdims=True)
  sims = nrm(test_f) @ nrm(train_f).T
  idx = np.argsort(-sims, axis=1)[:, :max(ks)]
  w = np.exp(np.take_along_axis(sims, idx, 1) / temperature)
  onehot = np.eye(num_classes)[train_l][idx] * w[..., None]
  return {k: float(np.mean(np.argmax(onehot[:, :k].sum(1), -1) == test_l)) for k in ks}, idx


# ----------------------------------------------------------------------------------
# The run's embeddings.
# ----------------------------------------------------------------------------------
def run_embeddings(workdir: str, n: int, n_train: int, n_test: int):
  """(config, z1, z2 of a fixed batch of n training images, backbone features and labels
  of n_train training and n_test test images) of the run's latest checkpoint."""
  config = load_run_config(workdir)
  _, tree = ckpt_lib.restore_subtree(f"{workdir}/checkpoints", None, ("params", "batch_stats"))
  train_set = sources.load(config.data, "train")
  test_set = sources.load(config.data, "test")
  parts = train.build_parts(config, train_set.num_classes, 100, 1000)
  state = types.SimpleNamespace(params=tree["params"], batch_stats=tree["batch_stats"])
  rng = np.random.default_rng(0)
  batch = {"images": jnp.asarray(train_set.images[rng.permutation(len(train_set))[:n]])}
  x1, x2 = make_views(parts, jax.random.PRNGKey(1), jnp.int32(0), batch)
  embed = jax.jit(lambda x: online_embeddings(parts, state, x))
  (_, z1), (_, z2) = embed(x1), embed(x2)
  features = lambda images: np.concatenate([np.asarray(embed(parts_input(parts, images[i:i + 256]))[0])
                                            for i in range(0, len(images), 256)])
  train_idx, test_idx = rng.permutation(len(train_set))[:n_train], rng.permutation(len(test_set))[:n_test]
  return (config, np.asarray(z1), np.asarray(z2), features(train_set.images[train_idx]), train_set.labels[train_idx],
          features(test_set.images[test_idx]), test_set.labels[test_idx], train_set.num_classes)


def parts_input(parts, images):
  """Centre images as the encoder sees them (normalised float32)."""
  return augment.normalize(augment.to_float(jnp.asarray(images)), parts.mean, parts.std)


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="a training run's work directory (its latest checkpoint)")
  parser.add_argument("--n", type=int, default=0, help="pairs in the batch (default: the run's train.batch_size)")
  parser.add_argument("--knn_train", type=int, default=2048)
  parser.add_argument("--knn_test", type=int, default=512)
  args = parser.parse_args()
  config0 = load_run_config(args.workdir)
  n = args.n or config0.train.batch_size
  config, z1, z2, train_f, train_l, test_f, test_l, num_classes = run_embeddings(
      args.workdir, max(n, config0.eval.mi_batch_size), args.knn_train, args.knn_test)
  m = config.method
  norm = O.l2_normalize if m.get("normalize", "none") == "l2" else (lambda z: z)
  zb1, zb2 = np.asarray(norm(jnp.asarray(z1[:n]))), np.asarray(norm(jnp.asarray(z2[:n])))
  rows = []
  print(f"run {args.workdir}: {config.method.name}, d={z1.shape[1]}, batch n={n}, eps={m.eps}, order={m.order}; "
        f"device {jax.devices()[0].device_kind}, jax {jax.__version__}")

  # Covariances -> exact log-determinants (the only product: x^T x).
  cfg = ld_lib.LogdetConfig(backend="cholesky", eps=m.eps, gram=False)
  f64 = _symmetric_factors64(zb1.astype(np.float64), zb2.astype(np.float64))
  ld64 = {k: _logdet64(x, m.eps) for k, x in f64.items()}
  lds = three_ways(lambda a, b: {k: ld_lib.covariance_logdet(x, cfg)[0]
                                 for k, x in O.covariance_factors(a, b, "symmetric").items()}, zb1, zb2)
  mi64 = ld64["marginal"] - 0.5 * (ld64["sum"] + ld64["diff"])
  mis = [v["marginal"] - 0.5 * (v["sum"] + v["diff"]) for v in lds]
  worst = lambda v: max(abs(v[k] - ld64[k]) for k in ld64)
  rows.append(("covariances x^T x -> exact log-dets: worst abs error (nats)", *map(worst, lds)))
  rows.append((f"  the MI from them, {mi64:.4f} nats: abs error", *(abs(v - mi64) for v in mis)))

  # The Taylor polynomial's powers (M @ M), on the exact covariance.
  a64 = f64["marginal"].T @ f64["marginal"] + m.eps * np.eye(zb1.shape[1])
  beta = float(np.linalg.eigvalsh(a64)[-1])
  t64 = _taylor64(a64, beta, m.order)
  ts = three_ways(lambda a: ld_lib.taylor_logdet(a, jnp.float32(beta), m.order), a64.astype(np.float32))
  rows.append((f"Taylor powers (order {m.order}) of the marginal covariance, surrogate {t64:.4f}: abs error",
               *(abs(v - t64) for v in ts)))

  # The training loss as the method computes it: covariances, power iteration, powers.
  loss_cfg = O.EmmiConfig(form=m.form, logdet=O.LogdetConfig(
      backend=m.backend, eps=m.eps, order=m.order, rescale=m.rescale, rescale_c=m.rescale_c,
      eig_momentum=m.eig_momentum, power_iters=m.power_iters), w_inv=m.w_inv, smoothing=m.smoothing)
  state = O.init_emmi_state(zb1.shape[1], loss_cfg)
  loss_and_grad = lambda a, b: jax.value_and_grad(lambda u: O.emmi_loss(norm(u), norm(b), state, loss_cfg)[0])(a)
  (l32, g32), (lsh, gsh), (lev, gev) = three_ways(loss_and_grad, z1[:n], z2[:n])
  rows.append((f"EMMI loss ({m.backend}, every product), {l32:.4f} nats: abs error vs float32", None,
               abs(lsh - l32), abs(lev - l32)))
  rows.append(("  its gradient w.r.t. z1: relative error vs float32", None, rel(gsh, g32), rel(gev, g32)))

  # The critics (cosine / tau), on the MI tracker's batch.
  tau = 0.1
  big1, big2 = z1, z2
  c64 = _critics64(big1.astype(np.float64), big2.astype(np.float64), tau)
  cs = three_ways(lambda a, b: {k: getattr(O, k[3:])(a, b, tau) for k in c64}, big1, big2)
  for k in c64:
    rows.append((f"critic {k} (tau {tau}, n={len(big1)}), {c64[k]:.4f} nats: abs error", *(abs(v[k] - c64[k]) for v in cs)))

  # The Gaussian MI of the tracker (principal directions: covariance, eigh, projections).
  gs = three_ways(lambda a, b: O.principal_gaussian_mi(a, b), big1, big2)
  rows.append((f"Gaussian MI (principal, n={len(big1)}), {gs[0]:.4f} nats: abs error vs float32", None,
               abs(gs[1] - gs[0]), abs(gs[2] - gs[0])))

  # kNN similarities.
  ks = tuple(config.eval.knn_k)
  acc64, idx64 = _knn64(train_f.astype(np.float64), train_l, test_f.astype(np.float64), test_l, num_classes, ks,
                        config.eval.knn_temperature)
  tr = O.l2_normalize(jnp.asarray(train_f))
  onehot = jax.nn.one_hot(jnp.asarray(train_l), num_classes)
  knn = lambda te: {k: v / len(test_l) for k, v in _knn_chunk.__wrapped__(
      tr, onehot, O.l2_normalize(te), jnp.asarray(test_l), ks, num_classes, config.eval.knn_temperature).items()}
  accs = three_ways(knn, test_f)
  for k in ks:
    rows.append((f"kNN top-1, k={k} ({len(train_l)} train, {len(test_l)} test), {acc64[k]:.4f}: abs error",
                 *(abs(float(v[k]) - acc64[k]) for v in accs)))

  print("\n| statistic | float32 vs float64 | one bf16 pass, as shipped | one bf16 pass everywhere |\n|---|---|---|---|")
  for name, *errors in rows:
    print(f"| {name} | " + " | ".join("(reference)" if e is None else f"{e:.3g}" for e in errors) + " |")


if __name__ == "__main__":
  main()
