"""Log-determinants of covariance matrices: exact backends and the Taylor surrogate.

Every covariance in emim is given by a *factor* ``x`` of shape (m, d) whose rows are
centred samples already divided by sqrt(m), so that the matrix is

    A = x^T x + eps * I_d.

Working from the factor lets one function choose between the direct d x d problem and
the Gram form (Sylvester's identity, an m x m problem) when m < d, and lets the power
iteration that tracks lambda_max run matrix-free at O(m d) per iteration.

Backends (spec/objectives.md, section 1):
  * ``cholesky``: 2 sum log diag chol(A), exact; the reference for tests.
  * ``eigh``: sum log eigvalsh(A), exact; a reference only, slow on accelerators.
  * ``taylor``: d log(beta) + sum_{k=1..K} (-1)^(k+1)/k tr((A/beta - I)^k), the order-K
    Taylor polynomial of log around 1 applied to the spectrum of A/beta. Built from
    traces of matrix powers (matrix products only), bounded with a bounded gradient as
    an eigenvalue goes to zero, and convergent for spectra inside (0, 2 beta).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp

from emim.objectives.precision import float32_products

Array = jax.Array
Backend = Literal["cholesky", "eigh", "taylor"]
Rescale = Literal["trace", "max_eig"]

BACKENDS = ("cholesky", "eigh", "taylor")
RESCALES = ("trace", "max_eig")


@dataclasses.dataclass(frozen=True)
class LogdetConfig:
  """How to evaluate ld(A + eps I) for a covariance A.

  Attributes:
    backend: "cholesky" | "eigh" | "taylor".
    eps: ridge added before any log-determinant.
    order: K, the order of the Taylor polynomial (taylor only).
    rescale: how beta is chosen (taylor only): "trace" for c * tr(A) / d, stateless,
      or "max_eig" for c * lambda_max tracked by warm-started power iteration.
    rescale_c: the constant c.
    eig_momentum: EMA momentum of the tracked lambda_max ("max_eig" only).
    power_iters: power iterations per step ("max_eig" only).
    gram: "auto" uses the m x m Gram form when m < d; True/False force it.
  """

  backend: Backend = "taylor"
  eps: float = 1e-4
  order: int = 4
  rescale: Rescale = "max_eig"
  rescale_c: float = 1.0
  eig_momentum: float = 0.9
  power_iters: int = 3
  gram: Any = "auto"

  def __post_init__(self):
    if self.backend not in BACKENDS:
      raise ValueError(f"Unknown logdet backend {self.backend!r}; choose one of {BACKENDS}.")
    if self.rescale not in RESCALES:
      raise ValueError(f"Unknown rescale {self.rescale!r}; choose one of {RESCALES}.")
    if self.order < 1:
      raise ValueError(f"Taylor order must be >= 1, got {self.order}.")
    if self.eps < 0:
      raise ValueError(f"eps must be >= 0, got {self.eps}.")
    if self.rescale_c <= 0.5 and self.rescale == "max_eig":
      raise ValueError(
          f"rescale_c={self.rescale_c} puts lambda_max/beta = 1/c at or beyond 2, outside"
          " the Taylor series' convergence region; use rescale_c > 0.5.")
    if self.gram not in ("auto", True, False):
      raise ValueError(f"gram must be 'auto', True or False, got {self.gram!r}.")

  @property
  def tracks_eigenvalue(self) -> bool:
    return self.backend == "taylor" and self.rescale == "max_eig"


# ----------------------------------------------------------------------------------
# The Taylor polynomial of log(x) around x = 1.
# ----------------------------------------------------------------------------------
def taylor_coefficients(order: int) -> list[float]:
  """c_k = (-1)^(k+1) / k for k = 1..order, so log(x) ~ sum_k c_k (x - 1)^k."""
  return [(-1.0) ** (k + 1) / k for k in range(1, order + 1)]


def taylor_log(x: Array, order: int) -> Array:
  """p_K(x): the order-K Taylor polynomial of log at 1, elementwise."""
  u = x - 1.0
  return sum(c * u ** (k + 1) for k, c in enumerate(taylor_coefficients(order)))


@float32_products
def power_traces(m: Array, order: int) -> list[Array]:
  """[tr(M), tr(M^2), ..., tr(M^order)] for a symmetric M, with matrix products only.

  For symmetric M and P_j = M^j: tr(M^(2j)) = ||P_j||_F^2 and
  tr(M^(2j+1)) = sum(P_j * P_(j+1)), so order K costs ceil(K/2) - 1 matrix products
  (one for K = 3 or 4).
  """
  powers = [None, m]  # powers[j] = M^j
  while len(powers) - 1 < (order + 1) // 2:
    powers.append(powers[-1] @ m)
  traces = []
  for k in range(1, order + 1):
    if k == 1:
      traces.append(jnp.trace(m))
    elif k % 2 == 0:
      p = powers[k // 2]
      traces.append(jnp.sum(p * p))
    else:
      j = k // 2
      traces.append(jnp.sum(powers[j] * powers[j + 1]))
  return traces


def taylor_logdet(a: Array, beta: Array, order: int) -> Array:
  """d log(beta) + sum_k c_k tr((A/beta - I)^k): the Taylor surrogate of ld(A).

  Args:
    a: symmetric (d, d) matrix (the ridge already added).
    beta: positive scalar; treated as a constant (the caller stops its gradient).
    order: K.

  Returns:
    The scalar surrogate, exactly sum_i p_K(lambda_i / beta) + d log(beta).
  """
  d = a.shape[-1]
  m = a / beta - jnp.eye(d, dtype=a.dtype)
  traces = power_traces(m, order)
  return d * jnp.log(beta) + sum(c * t for c, t in zip(taylor_coefficients(order), traces))


def cholesky_logdet(a: Array) -> Array:
  """Exact ld(A) of a symmetric positive-definite A, from its Cholesky factor."""
  chol = jnp.linalg.cholesky(a)
  return 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), axis=-1)


def eigh_logdet(a: Array) -> Array:
  """Exact ld(A) from eigvalsh: a reference, never the hot path."""
  return jnp.sum(jnp.log(jnp.linalg.eigvalsh(a)), axis=-1)


# ----------------------------------------------------------------------------------
# Tracking lambda_max for the rescaling.
# ----------------------------------------------------------------------------------
@float32_products
def _power_iteration(matvec, v: Array, iters: int) -> tuple[Array, Array]:
  """(Rayleigh quotient, unit vector) after ``iters`` power iterations from v."""

  def body(_, v):
    w = matvec(v)
    return w / (jnp.linalg.norm(w) + 1e-30)

  v = v / (jnp.linalg.norm(v) + 1e-30)
  v = jax.lax.fori_loop(0, iters, body, v)
  return jnp.vdot(v, matvec(v)), v


def power_iteration(x: Array, eps: float, v: Array, iters: int) -> tuple[Array, Array]:
  """Largest eigenvalue of x^T x + eps I by power iteration warm-started at v, without
  forming the d x d matrix.

  Returns:
    (lambda_max estimate as the Rayleigh quotient, the unit eigenvector estimate).
  """
  return _power_iteration(lambda v: x.T @ (x @ v) + eps * v, v, iters)


def init_eig_state(dim: int, seed: int = 0) -> dict[str, Array]:
  """State of one tracked eigenvalue: the eigenvector estimate and the EMA of lambda_max.

  ``lam`` starts at 0, which the first update reads as "no history yet".
  """
  v = jax.random.normal(jax.random.PRNGKey(seed), (dim,), jnp.float32)
  return {"v": v / jnp.linalg.norm(v), "lam": jnp.zeros((), jnp.float32)}


def rescaling_beta(matvec, trace: Array, d: int, cfg: LogdetConfig, eig_state: dict[str, Array] | None):
  """beta for the Taylor surrogate of ld(A + eps I) (a constant: its gradient is stopped).

  Args:
    matvec: v -> (A + eps I) v.
    trace: tr(A), without the ridge.
    d: the dimension of A.

  In "max_eig" mode lambda_max is tracked across steps; beta = c * max(EMA, current).
  The EMA steadies beta while the spectrum shrinks; taking the max with the current
  estimate keeps lambda_max / beta <= 1/c < 2 while it grows faster than the EMA follows,
  which is what keeps the series inside its convergence region early in training.

  Returns:
    (beta, new eig_state or None, lambda_max estimate of this batch or None).
  """
  if cfg.rescale == "trace":
    return cfg.rescale_c * (trace + d * cfg.eps) / d, eig_state, None
  if eig_state is None:
    raise ValueError("rescale='max_eig' needs its tracked state; build it with init_eig_state.")
  lam, v = _power_iteration(matvec, eig_state["v"], cfg.power_iters)
  prev = eig_state["lam"]
  ema = jnp.where(prev > 0, cfg.eig_momentum * prev + (1.0 - cfg.eig_momentum) * lam, lam)
  beta = cfg.rescale_c * jnp.maximum(ema, lam)
  return beta, {"v": v, "lam": ema}, lam


def _use_gram(m: int, d: int, gram) -> bool:
  return (m < d) if gram == "auto" else bool(gram)


@float32_products
def covariance_logdet(
    x: Array, cfg: LogdetConfig, eig_state: dict[str, Array] | None = None
) -> tuple[Array, dict[str, Array] | None, dict[str, Array]]:
  """ld(x^T x + eps I) with the configured backend, in float32.

  Args:
    x: (m, d) factor: centred samples divided by sqrt(m).
    cfg: the backend and its knobs.
    eig_state: the tracked eigenvalue state when ``cfg.tracks_eigenvalue``.

  Returns:
    (log-determinant, updated eig_state, diagnostics). Diagnostics hold ``beta`` and
    ``rescaled_eig_max`` (lambda_max / beta; must stay below 2) for the Taylor backend.
  """
  x = x.astype(jnp.float32)
  m, d = x.shape
  eps = cfg.eps
  gram = _use_gram(m, d, cfg.gram)
  if gram and m > d:
    raise ValueError(f"The Gram form needs m <= d, got m={m}, d={d}.")
  # The matrix the log-determinant is taken of: A (d x d) or G = x x^T + eps I (m x m).
  # ld(A) = (d - m) log(eps) + ld(G): both share the m leading eigenvalues and A has
  # d - m more equal to eps.
  inner = x @ x.T if gram else x.T @ x
  size = inner.shape[0]
  mat = inner + eps * jnp.eye(size, dtype=jnp.float32)
  n_eps = d - size  # eigenvalues of A equal to eps that the Gram matrix leaves out

  sg_x = jax.lax.stop_gradient(x)
  return _backend_logdet(mat, n_eps, d, cfg, eig_state, lambda v: sg_x.T @ (sg_x @ v) + eps * v, jnp.sum(sg_x * sg_x))


@float32_products
def matrix_logdet(
    a: Array, cfg: LogdetConfig, eig_state: dict[str, Array] | None = None
) -> tuple[Array, dict[str, Array] | None, dict[str, Array]]:
  """ld(a + eps I) for a symmetric PSD (d, d) matrix (e.g. a smoothed covariance), with
  the configured backend; as ``covariance_logdet`` but without the Gram form."""
  a = a.astype(jnp.float32)
  d = a.shape[0]
  sg_a = jax.lax.stop_gradient(a)
  mat = a + cfg.eps * jnp.eye(d, dtype=jnp.float32)
  return _backend_logdet(mat, 0, d, cfg, eig_state, lambda v: sg_a @ v + cfg.eps * v, jnp.trace(sg_a))


def _backend_logdet(mat, n_eps, d, cfg, eig_state, matvec, trace):
  """The backend dispatch shared by the factor and matrix forms. ``mat`` carries the
  ridge; ``n_eps`` more eigenvalues equal to eps were left out of it (Gram form)."""
  eps = cfg.eps
  diag = {}
  if cfg.backend == "taylor":
    beta, eig_state, lam = rescaling_beta(matvec, trace, d, cfg, eig_state)
    beta = jax.lax.stop_gradient(beta)
    value = taylor_logdet(mat, beta, cfg.order)
    if n_eps:
      # The left-out eigenvalues each add p_K(eps / beta) + log(beta); the call above
      # already counted log(beta) for the others.
      value = value + n_eps * (jnp.log(beta) + taylor_log(eps / beta, cfg.order))
    diag["beta"] = beta
    if lam is not None:
      diag["rescaled_eig_max"] = lam / beta
    return value, eig_state, diag

  if n_eps and eps <= 0:
    raise ValueError("The Gram form of an exact log-determinant needs eps > 0.")
  exact = cholesky_logdet if cfg.backend == "cholesky" else eigh_logdet
  value = exact(mat)
  if n_eps:
    value = value + n_eps * math.log(eps)
  return value, eig_state, diag
