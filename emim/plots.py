"""Pictures of training runs: MI estimates, loss terms, effective rank, kNN over time, EMMI's
rescaled spectrum, and the embeddings in 2-D.

    python -m emim.plots --workdir=runs/a,runs/b --output=figures

writes PNGs to --output: ``mi_estimates.png`` (every run on one axis per estimator, the
exact MI dotted where the data has one), ``losses.png`` (each run's loss terms and its
learning rate), ``effective_rank.png``, ``knn.png`` (periodic kNN, with the random
initialisation's as a dotted line where ``emim.evaluate --random_init`` recorded it), and
per run ``spectrum_<run>.png`` (EMMI: the eigenvalues of its covariance statistics before
and after beta-rescaling, the Taylor series' region (0, 2) shaded) and
``embeddings_<run>.png`` (the test embeddings' two leading principal components, coloured
by class). Each ``plot_*`` function also returns its matplotlib figure, for notebooks.
Needs matplotlib (``pip install emim[plots]``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np
from absl import app, flags, logging

from emim import fs
from emim.metric_writer import read_metrics

ESTIMATORS = {"eval/mi_dv": "DV (cosine critic)", "eval/mi_infonce": "InfoNCE (cosine critic)",
              "eval/mi_jsd": "JSD (cosine critic)", "eval/mi_gaussian": "Gaussian (principal directions)"}
def _pyplot():
  try:
    import matplotlib
  except ImportError as e:
    raise ImportError("emim.plots draws with matplotlib: pip install 'emim[plots]' (or matplotlib).") from e
  if not os.environ.get("MPLBACKEND") and "ipykernel" not in sys.modules:
    matplotlib.use("Agg")  # files, no display; a notebook keeps its inline backend
  import matplotlib.pyplot as plt

  return plt


@dataclasses.dataclass
class Run:
  """A training run's records: its name, metrics.jsonl rows, and evaluation.json."""

  name: str
  workdir: fs.Path
  rows: list[dict]
  evaluation: dict

  def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of every row that has ``key``."""
    pairs = [(r["step"], r[key]) for r in self.rows if key in r and r[key] is not None]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs], dtype=float)

  def keys(self) -> set[str]:
    return {k for r in self.rows for k in r}


def load_run(workdir: fs.PathLike, name: str | None = None) -> Run:
  workdir = fs.as_path(workdir)
  path = workdir / "metrics.jsonl"
  if not path.exists():
    raise FileNotFoundError(f"No {path}: --workdir must be a training run's work directory.")
  evaluation = json.loads((workdir / "evaluation.json").read_text()) if (workdir / "evaluation.json").exists() else {}
  return Run(name or workdir.name, workdir, read_metrics(path), evaluation)


def _style(i: int, runs: list[Run]) -> dict:
  """Run i's line: a colour of its own (tab20 past ten runs), dashed for an ablation."""
  import matplotlib

  colours = matplotlib.colormaps["tab10" if len(runs) <= 10 else "tab20"]
  return {"color": colours(i % colours.N), "ls": "--" if "no_" in runs[i].name else "-"}


def branch_key(key: str) -> str:
  """The key of an online-pair estimate's branch-pair twin: eval/mi_x -> eval/branch_mi_x."""
  return key.replace("eval/", "eval/branch_", 1)


def plot_mi(runs: list[Run]):
  """The MI estimates over steps, one panel per estimator, every run on it: the online
  encoder's two views in the run's style, and where the method's critic scores another
  pair (``eval/branch_mi_*``: SDMI's h(f(x_a)) against g(x_b), EMMI's online against
  target) that pair dash-dotted in the run's colour; the data's exact MI dotted, where
  known."""
  plt = _pyplot()
  present = [k for k in ESTIMATORS if any(k in r.keys() for r in runs)]
  fig, axes = plt.subplots(1, max(len(present), 1), figsize=(4.2 * max(len(present), 1), 3.4), squeeze=False)
  for ax, key in zip(axes[0], present):
    for i, run in enumerate(runs):
      steps, values = run.series(key)
      ax.plot(steps, values, label=run.name, **_style(i, runs))
      branch_steps, branch_values = run.series(branch_key(key))
      if len(branch_values):
        ax.plot(branch_steps, branch_values, label=f"{run.name}: critic's pair", color=_style(i, runs)["color"],
                ls="-.", lw=1.0)
      true_steps, true_mi = run.series("eval/true_mi")
      if len(true_mi):
        ax.axhline(true_mi[-1], color="k", ls=":", lw=1.5, label="exact MI of the views" if i == 0 else None)
    ax.set_title(ESTIMATORS[key])
    ax.set_xlabel("step")
    ax.set_ylabel("nats")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  return fig


def plot_pairs(runs: list[Run], key: str = "eval/mi_infonce"):
  """One estimate of each run over steps, in two panels: the pair the method's critic
  scores (``eval/branch_mi_*``; the online pair for methods whose critic scores that) and
  the online encoder's two views; the data's exact MI dotted where known (of the first
  run's data)."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.6), sharey=True)
  for i, run in enumerate(runs):
    branch = run.series(branch_key(key))
    axes[0].plot(*(branch if len(branch[1]) else run.series(key)), label=run.name, **_style(i, runs))
    axes[1].plot(*run.series(key), label=run.name, **_style(i, runs))
  name = ESTIMATORS.get(key, key)
  axes[0].set_title(f"{name}: the critic's pair", fontsize=10)
  axes[1].set_title(f"{name}: the online encoder's two views", fontsize=10)
  _, true_mi = runs[0].series("eval/true_mi") if runs else (None, [])
  for ax in axes:
    ax.set_xlabel("step")
    if len(true_mi):
      ax.axhline(true_mi[-1], color="k", ls=":", lw=1.2, label="exact MI of the views")
  axes[0].set_ylabel("nats")
  axes[1].legend(fontsize=7, loc="best")
  fig.tight_layout()
  return fig


def _loss_terms(run: Run) -> list[str]:
  """The objective's terms among a run's step metrics (those its progress lines show)."""
  from emim.train import is_loss_term

  rows = [r for r in run.rows if "loss" in r]
  # Besides the step's own metrics a progress line's row holds its rates and counters.
  logged = ("step", "epoch", "steps_per_s", "pairs_per_s", "probe_acc", "finite", "refused_in_a_row")
  return sorted({k for r in rows for k in r if "/" not in k and k not in logged and is_loss_term(k)})


def plot_losses(runs: list[Run]):
  """Each run's loss terms (one panel per run) and every run's learning rate."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(runs) + 1, figsize=(4.2 * (len(runs) + 1), 3.4), squeeze=False)
  for ax, run in zip(axes[0], runs):
    for key in _loss_terms(run):
      ax.plot(*run.series(key), label=key)
    ax.set_title(f"{run.name}: loss terms")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
  lr_ax = axes[0][-1]
  for i, run in enumerate(runs):
    lr_ax.plot(*run.series("lr"), label=run.name, **_style(i, runs))
  lr_ax.set_title("learning rate")
  lr_ax.set_xlabel("step")
  lr_ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def plot_rank(runs: list[Run]):
  """The effective rank (exp of the spectral entropy) and std of the embeddings over steps."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.4))
  for i, run in enumerate(runs):
    axes[0].plot(*run.series("eval/effective_rank"), label=run.name, **_style(i, runs))
    axes[1].plot(*run.series("eval/embedding_std"), label=run.name, **_style(i, runs))
  axes[0].set_title("effective rank of the embeddings")
  axes[1].set_title("embedding std (per dimension, l2-normalised)")
  for ax in axes:
    ax.set_xlabel("step")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  return fig


def plot_knn(runs: list[Run], key: str = "knn/knn_top1_k20"):
  """Periodic kNN accuracy over steps; the random initialisation's, where recorded,
  dotted in the run's colour."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  for i, run in enumerate(runs):
    steps, acc = run.series(key)
    ax.plot(steps, 100 * acc, marker="o", ms=3, label=run.name, **_style(i, runs))
    baseline = run.evaluation.get("random_init", {}).get(key.split("/")[-1])
    if baseline is not None:
      ax.axhline(100 * baseline, color=_style(i, runs)["color"], ls=":", label=f"{run.name}: random init")
  ax.set_xlabel("step")
  ax.set_ylabel(f"kNN top-1 (%), k={key.rsplit('k', 1)[-1]}")
  ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def run_embeddings(workdir: fs.PathLike, split: str = "test", n: int = 2000, views: bool = False):
  """The online encoder of a run's latest checkpoint on ``n`` examples of ``split``, in
  inference mode: (features, embeddings, labels, config); with ``views``, the
  embeddings of two augmented views instead of one (as the objective sees them).
  Data held in memory only (a streamed dataset: None)."""
  import jax

  from emim import checkpoint as ckpt_lib
  from emim import train
  from emim.backbone import checkpoint_dir, load_run_config
  from emim.data import sources
  from emim.train_step import make_views

  config = load_run_config(workdir)
  if config.data.stream:
    logging.info("%s streams its data: no embeddings plotted.", workdir)
    return None
  _, tree = ckpt_lib.restore_subtree(checkpoint_dir(workdir), None, ("params", "batch_stats"))
  data = sources.load(config.data, split, cache_dir=fs.local_cache_dir(workdir))
  idx = np.random.default_rng(0).permutation(len(data))[:n]
  inputs, labels = data.inputs[idx], data.labels[idx]
  parts = train.build_parts(config, data.num_classes, 1, 1)
  variables = {"params": tree["params"]["encoder"], "batch_stats": tree["batch_stats"]["encoder"]}
  encode = jax.jit(lambda x: parts.encoder.apply(variables, x, train=False))
  if views:
    x1, x2 = make_views(parts, jax.random.PRNGKey(0), 0, {data.input_key: inputs})
    return encode(x1)[1], encode(x2)[1], labels, config
  if data.input_key == "images":
    from emim.data import augment

    inputs = augment.normalize(augment.to_float(inputs), config.data.mean, config.data.std)
  features, z = encode(inputs)
  return np.asarray(features), np.asarray(z), labels, config


def plot_spectrum(workdir: fs.PathLike, n: int = 512):
  """EMMI's covariance statistics on two views of ``n`` training examples: the sorted
  eigenvalues of each (with the objective's eps) and the same over beta = c lambda_max,
  where the Taylor series of the log-determinant converges, (0, 2). None for other methods."""
  from emim import objectives as O

  plt = _pyplot()
  out = run_embeddings(workdir, "train", n, views=True)
  if out is None or out[3].method.name != "emmi":
    return None
  z1, z2, _, config = out
  m = config.method
  if m.normalize == "l2":
    z1, z2 = O.l2_normalize(z1), O.l2_normalize(z2)
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
  smallest = 1.0
  for name, x in O.covariance_factors(z1, z2, "symmetric").items():
    x = np.asarray(x, np.float64)
    lam = np.sort(np.linalg.eigvalsh(x.T @ x))[::-1] + m.eps  # offline: eigvalsh is fine here
    rescaled = lam / (m.rescale_c * lam[0])
    smallest = min(smallest, rescaled[-1])
    axes[0].semilogy(lam, label=name)
    axes[1].semilogy(rescaled, label=name)
  axes[0].set_title("eigenvalues (with eps)")
  axes[1].set_title(r"after rescaling by $\beta = c\,\lambda_{max}$")
  axes[1].set_ylim(smallest / 3, 4.0)
  axes[1].axhspan(smallest / 3, 2.0, color="C2", alpha=0.12, label="Taylor region (0, 2)")
  for ax in axes:
    ax.set_xlabel("index")
    ax.legend(fontsize=7)
  fig.suptitle(f"{fs.as_path(workdir).name}: EMMI's statistics on {n} training examples")
  fig.tight_layout()
  return fig


def plot_embeddings(workdir: fs.PathLike, n: int = 2000):
  """The test embeddings' two leading principal components, coloured by class."""
  plt = _pyplot()
  out = run_embeddings(workdir, "test", n)
  if out is None:
    return None
  _, z, labels, _ = out
  centred = z - z.mean(0)
  _, s, vt = np.linalg.svd(centred, full_matrices=False)
  xy = centred @ vt[:2].T
  explained = (s[:2] ** 2).sum() / max((s**2).sum(), 1e-12)
  fig, ax = plt.subplots(figsize=(4.6, 4.2))
  scatter = ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10", s=4)
  ax.set_title(f"{fs.as_path(workdir).name}: PCA of the embeddings ({100 * explained:.0f}% of the variance)")
  ax.legend(*scatter.legend_elements(), fontsize=6, title="class", loc="best")
  fig.tight_layout()
  return fig


def write_all(workdirs: list[str], output: fs.PathLike) -> list[fs.Path]:
  """Every figure for the runs in ``workdirs`` as PNGs in ``output``; returns the paths."""
  plt = _pyplot()
  output = fs.as_path(output)
  output.mkdir(parents=True, exist_ok=True)
  runs = [load_run(w) for w in workdirs]
  figures = {"mi_estimates": plot_mi(runs), "losses": plot_losses(runs), "effective_rank": plot_rank(runs)}
  if any("knn/knn_top1_k20" in r.keys() for r in runs):
    figures["knn"] = plot_knn(runs)
  for run in runs:
    if (run.workdir / "checkpoints").exists():
      figures[f"spectrum_{run.name}"] = plot_spectrum(run.workdir)
      figures[f"embeddings_{run.name}"] = plot_embeddings(run.workdir)
  written = []
  for name, fig in figures.items():
    if fig is None:
      continue
    path = output / f"{name}.png"
    with path.open("wb") as f:
      fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    written.append(path)
  return written


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  workdirs = [w for w in flags.FLAGS.workdir.split(",") if w]
  for path in write_all(workdirs, flags.FLAGS.output):
    logging.info("Wrote %s", path)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Training runs' work directories, comma-separated.", required=True)
  flags.DEFINE_string("output", None, "Where the PNGs go.", required=True)
  from emim import cli

  cli.run(main)
