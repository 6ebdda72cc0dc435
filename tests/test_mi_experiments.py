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


@pytest.mark.slow
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
    # The critic's pair (SDMI's h(f(x_a)) against g(x_b)) where it is another pair; JMI: none.
    branch = [r.get("eval/branch_mi_infonce") for r in metrics]
    if row["method"] == "sdmi":
      assert row["branch_mi_infonce_first"] == branch[0] and row["branch_mi_infonce_last"] == branch[-1]
      assert row["branch_mi_infonce_spearman"] == pytest.approx(spearmanr(steps, branch).statistic)
    else:
      assert branch == [None] * 4 and "branch_mi_infonce_last" not in row
  table = (out / "tracking.md").read_text().splitlines()
  assert table[2].startswith("| run | InfoNCE start |") and len(table) == 6
  assert f"| {rows[1]['mi_infonce_first']:.3g} |" in table[5]


@pytest.mark.slow
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
  # The critic's pair dash-dotted in the run's colour, for the SDMI run only.
  lines = {line.get_label(): line for line in fig.axes[1].get_lines()}
  assert lines["sdmi: critic's pair"].get_linestyle() == "-." and lines["sdmi: critic's pair"].get_color() == lines[
      "sdmi"].get_color()
  np.testing.assert_array_equal(lines["sdmi: critic's pair"].get_ydata(), runs[0].series("eval/branch_mi_infonce")[1])
  assert "taylor_dv-no_regularizer: critic's pair" not in lines


def test_sdmi_study_row_and_figure(tracking, tmp_path):
  out, _ = tracking
  mi = _experiments()
  run = plots.load_run(out / "runs" / "sdmi")
  steps, branch = run.series("eval/branch_mi_infonce")
  row = mi.summarise_study(out / "runs" / "sdmi")
  assert (row["branch_start"], row["branch_max"], row["branch_end"]) == (branch[0], branch.max(), branch[-1])
  assert row["branch_rho"] == pytest.approx(spearmanr(steps, branch).statistic)
  assert row["online_end"] == run.series("eval/mi_infonce")[1][-1]
  assert row["branch_effective_rank_target"] == run.series("eval/branch_effective_rank_target")[1][-1]
  table = mi.markdown("sdmi_study", [{"run": "sdmi", **row}]).splitlines()
  assert table[0].startswith("| setting | critic's pair start | max | end | rho | online pair start |")
  assert f"| {row['branch_max']:.3g} |" in table[2]
  # The figure: the critic's pair on the left (the online pair for a JMI run), the online pair on the right.
  runs = [run, plots.load_run(out / "runs" / "taylor_dv-no_regularizer")]
  fig = plots.plot_pairs(runs)
  left = {line.get_label(): line.get_ydata() for line in fig.axes[0].get_lines()}
  np.testing.assert_array_equal(left["sdmi"], branch)
  np.testing.assert_array_equal(left["taylor_dv-no_regularizer"], runs[1].series("eval/mi_infonce")[1])
  right = {line.get_label(): line.get_ydata() for line in fig.axes[1].get_lines()}
  np.testing.assert_array_equal(right["sdmi"], run.series("eval/mi_infonce")[1])
  import matplotlib.image

  path = mi.write_study_figure([str(out / "runs" / r) for r in ("sdmi", "taylor_dv-no_regularizer")],
                               tmp_path / "study.png")
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[0] > 200 and image.std() > 0.01


@pytest.mark.slow
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
  assert config.method.normalize == "l2"  # EMMI's default: the statistics are of unit vectors
  z1, z2 = (z / np.linalg.norm(z, axis=1, keepdims=True) for z in (np.asarray(z1, np.float64), np.asarray(z2, np.float64)))
  x = np.asarray(O.covariance_factors(z1, z2, "symmetric")["marginal"], np.float64)
  lam = np.sort(np.linalg.eigvalsh(x.T @ x))[::-1] + config.method.eps
  np.testing.assert_allclose(raw[0].get_ydata(), lam, rtol=1e-6)
  np.testing.assert_allclose(rescaled[0].get_ydata(), lam / lam[0], rtol=1e-6)
  assert max(rescaled[0].get_ydata()) <= 1.0 + 1e-9
  with pytest.raises(FileNotFoundError, match="work directory"):
    plots.load_run(tmp_path / "nothing_here")
