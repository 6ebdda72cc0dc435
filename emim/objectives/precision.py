"""Which matrix products of the statistics run in full float32 on every backend.

On a TPU a float32 matrix product at JAX's default precision is one bfloat16 pass (each
operand rounded to bfloat16, products summed in float32); on a GPU it is TF32. Measured
on the embeddings of a trained run with that pass replayed on a CPU
(benchmarks/matmul_precision.py, BENCHMARKS.md "Matrix-product precision"): the
log-determinants of the EMMI covariances moved by 0.066 nats (float32: 0.00014 from
float64), the Taylor surrogate by 0.012 nats, the EMMI gradient by 1.7%, and kNN top-1
at k = 200 by 0.8 points; the critics' similarity logits moved the DV, InfoNCE and JSD
estimates by 1e-4 nats or less. So every covariance and every product of covariances
(the Taylor polynomial's powers, the power iteration's matrix-vector products) and the
kNN's similarities run at ``Precision.HIGHEST`` (float32 accuracy; six bfloat16 passes on
a TPU, on d x d matrices that cost little beside the network), and the critics' logits,
like the network, at the default.
"""

from __future__ import annotations

import functools

import jax


def float32_products(fn):
  """``fn`` with every matrix product it traces (and their transposes in its gradient)
  at ``Precision.HIGHEST``: ``jax.default_matmul_precision`` scoped to the call."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.default_matmul_precision("highest"):
      return fn(*args, **kwargs)

  return wrapped
