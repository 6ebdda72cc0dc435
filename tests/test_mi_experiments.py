"""benchmarks/mi_experiments.py and emim.plots on CPU: the tables hold what the runs'
metrics say, the figures are written and readable."""

import importlib.util
import json
import math

import numpy as np
import pytest
from conftest import REPO
from scipy.stats import spearmanr

from emim import plots
from emim.metric_writer import read_metrics


def _experiments():
  spec = importlib.util.spec_from_file_location("mi_experiments", REPO / "benchmarks" / "mi_experiments.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_silhouette_against_its_definition():
  mi = _experiments()
  rng = np.random.default_rng(0)
  features = rng.normal(size=(40, 5)) + np.repeat(np.eye(5)[:4] * 3, 10, axis=0)
  labels = np.repeat(np.arange(4), 10)
  f = features / np.linalg.norm(features, axis=1, keepdims=True)
  d = 1 - f @ f.T
  expected = []
  for i in range(40):
    same = (labels == labels[i]) & (np.arange(40) != i)
    a = d[i, same].mean()
    b = min(d[i, labels == c].mean() for c in range(4) if c != labels[i])
    expected.append((b - a) / max(a, b))
  assert mi.silhouette(features, labels) == pytest.approx(np.mean(expected), rel=1e-9)
  assert mi.rising_share([1, 2, 1, 3, 4]) == 0.75


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
  out = tmp_path_factory.mktemp("tracking")
  rows = _experiments().main(["tracking", f"--out={out}", "--runlocal", "--methods=sdmi,taylor_dv+no_regularizer",
                              "--set", "train.num_steps=30", "--set", "train.log_every=10"])
  return out, rows


def test_tracking_table_is_what_the_runs_recorded(tracking):
  out, rows = tracking
  assert [r["run"] for r in rows] == ["sdmi", "taylor_dv-no_regularizer"]
  assert json.loads((out / "tracking.json").read_text()) == json.loads(json.dumps(rows))
  for row in rows:
    metrics = [r for r in read_metrics(out / "runs" / row["run"] / "metrics.jsonl") if "eval/mi_infonce" in r]
    steps, infonce = [r["step"] for r in metrics], [r["eval/mi_infonce"] for r in metrics]
    assert steps == [0, 10, 20, 30]
    assert row["mi_infonce_spearman"] == pytest.approx(spearmanr(steps, infonce).statistic)
    assert row["mi_infonce_last"] == infonce[-1] and row["mi_infonce_first"] == infonce[0]
    assert row["true_mi"] == pytest.approx(metrics[0]["eval/true_mi"])
    evaluation = json.loads((out / "runs" / row["run"] / "evaluation.json").read_text())
    assert row["knn_top1_k20"] == evaluation["30"]["knn_top1_k20"]
    assert row["knn_random_init"] == evaluation["random_init"]["knn_top1_k20"]
  table = (out / "tracking.md").read_text().splitlines()
  assert table[2].startswith("| run | InfoNCE start |") and len(table) == 6
  assert f"| {rows[1]['mi_infonce_first']:.3g} |" in table[5]


def test_figures_are_written_and_readable(tracking):
  out, _ = tracking
  import matplotlib.image

  names = sorted(p.name for p in (out / "figures").iterdir())
  assert names == ["effective_rank.png", "embeddings_sdmi.png", "embeddings_taylor_dv-no_regularizer.png", "knn.png",
                   "losses.png", "mi_estimates.png"]
  for name in names:
    image = matplotlib.image.imread(out / "figures" / name)
    assert image.ndim == 3 and image.shape[0] > 200 and image.std() > 0.01  # drawn, not blank
  # The functions return their figures for notebooks: one panel per estimator, a line per
  # run (dashed for an ablation), the exact MI dotted.
  runs = [plots.load_run(out / "runs" / r) for r in ("sdmi", "taylor_dv-no_regularizer")]
  fig = plots.plot_mi(runs)
  assert [ax.get_title() for ax in fig.axes] == list(plots.ESTIMATORS.values())
  labels = [line.get_label() for line in fig.axes[1].get_lines()]
  assert labels[0] == "sdmi" and "taylor_dv-no_regularizer" in labels
  styles = {line.get_label(): line.get_linestyle() for line in fig.axes[1].get_lines()}
  assert styles["sdmi"] == "-" and styles["taylor_dv-no_regularizer"] == "--"
  dotted = [line for line in fig.axes[1].get_lines() if line.get_linestyle() == ":"]
  assert math.isclose(dotted[0].get_ydata()[0], runs[0].series("eval/true_mi")[1][0])


def test_emmi_spectrum_is_rescaled_into_the_taylor_region(tmp_path):
  from conftest import tiny_config

  from emim import objectives as O
  from emim import train

  config = tiny_config("gaussian_mixture", "emmi,runlocal")
  train.run(config, str(tmp_path / "emmi"))
  fig = plots.plot_spectrum(tmp_path / "emmi", n=128)
  raw, rescaled = fig.axes[0].get_lines(), fig.axes[1].get_lines()
  assert [l.get_label() for l in raw] == ["marginal", "sum", "diff"]
  z1, z2, _, _ = plots.run_embeddings(tmp_path / "emmi", "train", 128, views=True)
  x = np.asarray(O.covariance_factors(z1, z2, "symmetric")["marginal"], np.float64)
  lam = np.sort(np.linalg.eigvalsh(x.T @ x))[::-1] + config.method.eps
  np.testing.assert_allclose(raw[0].get_ydata(), lam, rtol=1e-6)
  np.testing.assert_allclose(rescaled[0].get_ydata(), lam / lam[0], rtol=1e-6)
  assert max(rescaled[0].get_ydata()) <= 1.0 + 1e-9
  with pytest.raises(FileNotFoundError, match="work directory"):
    plots.load_run(tmp_path / "nothing_here")
