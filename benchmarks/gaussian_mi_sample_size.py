"""How the logged Gaussian MI depends on the batch it is measured on, for a real run.

    python benchmarks/gaussian_mi_sample_size.py --workdir=runs/cifar10 [--step N] \
        [--sizes 512 1024 2048 4096 8192] [--dims 16 32]

For the run's untrained initialisation (its step 0) and a checkpoint, embeds the two
tracker views of n training images (the fixed subset and view keys of the MI tracker,
drawn 512 at a time) and prints, for each n:
  * plug-in: the Gaussian MI of all d standardised dimensions with a 1e-3 ridge (what the
    tracker logged before it was debiased);
  * principal: ``principal_gaussian_mi``, the tracker's estimate, at its default dims
    min(d, n // 32) and at each fixed ``--dims``;
  * InfoNCE with the tracker's temperature, for comparison.
A trustworthy estimate barely moves with n and ranks the trained network above the
untrained one at every n.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from emim import backbone, checkpoint
from emim import objectives as O
from emim.data import sources
from emim.evaluators.mi_tracker import _EVAL_KEY, online_embeddings
from emim.fs import local_cache_dir
from emim.train import build_parts
from emim.train_step import init_state, make_views

_CHUNK = 512


def tracker_views(parts, state, images: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """The tracker's two views of ``images``, embedded by the online encoder."""

  @jax.jit
  def embed(state, chunk, key):
    x1, x2 = make_views(parts, key, jnp.int32(0), {"images": chunk})
    return online_embeddings(parts, state, x1)[1], online_embeddings(parts, state, x2)[1]

  # The first chunk takes the tracker's own key: with the default eval.mi_batch_size (512)
  # its views are those the run logged.
  keys = [jax.random.PRNGKey(_EVAL_KEY)] + [jax.random.fold_in(jax.random.PRNGKey(_EVAL_KEY), i)
                                            for i in range(1, -(-len(images) // _CHUNK))]
  pairs = [embed(state, jnp.asarray(images[i * _CHUNK:(i + 1) * _CHUNK]), key) for i, key in enumerate(keys)]
  return jnp.concatenate([p[0] for p in pairs]), jnp.concatenate([p[1] for p in pairs])


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="a training run's work directory")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
  parser.add_argument("--dims", type=int, nargs="+", default=[16, 32])
  parser.add_argument("--tau", type=float, default=0.1, help="the tracker's cosine-critic temperature")
  args = parser.parse_args()
  if any(n % _CHUNK and n > _CHUNK for n in args.sizes):
    parser.error(f"--sizes above {_CHUNK} must be multiples of {_CHUNK}.")

  workdir = pathlib.Path(args.workdir)
  config = backbone.load_run_config(workdir)
  train = sources.load(config.data, "train", cache_dir=local_cache_dir(workdir))
  images = train.images[np.random.default_rng(1).permutation(len(train))[:max(args.sizes)]]
  parts = build_parts(config, train.num_classes, steps_per_epoch=1, total_steps=1)
  initial = init_state(parts, jax.random.PRNGKey(config.seed))
  step, saved = checkpoint.restore_subtree(workdir / "checkpoints", args.step, ("params", "batch_stats"))
  trained = initial.replace(params=saved["params"], batch_stats=saved["batch_stats"])

  print(f"{workdir}: {config.model.backbone} width {config.model.width}, embeddings of "
        f"{config.model.projector_dims[-1]} dims; step 0 (untrained) and step {step}")
  header = ["state", "n", "plug-in", "principal(k)"] + [f"k={k}" for k in args.dims] + ["InfoNCE"]
  print(" | ".join(header))
  for name, state in (("step 0", initial), (f"step {step}", trained)):
    z1_all, z2_all = tracker_views(parts, state, images)
    for n in args.sizes:
      z1, z2 = z1_all[:n], z2_all[:n]
      d = z1.shape[1]
      plug_in = O.gaussian_mi(O.standardize(z1), O.standardize(z2), form="joint", eps=1e-3)
      k = O.default_principal_dims(n, d)
      row = [name, str(n), f"{float(plug_in):.2f}", f"{float(O.principal_gaussian_mi(z1, z2)):.2f} ({k})"]
      row += [f"{float(O.principal_gaussian_mi(z1, z2, dims)):.2f}" if n // 2 > 2 * dims and dims <= d else "-"
              for dims in args.dims]
      row.append(f"{float(O.infonce(z1, z2, args.tau)):.2f}")
      print(" | ".join(row), flush=True)


if __name__ == "__main__":
  main()
