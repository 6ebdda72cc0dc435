"""Seed 002's three experiments and the SDMI prototype's study, one command each: a table
(markdown and JSON) and figures.

    python benchmarks/mi_experiments.py tracking   --out=/tmp/mi_tracking    # 8 methods, 4-7 min on a 2-core CPU
    python benchmarks/mi_experiments.py ablation   --out=/tmp/mi_ablation
    python benchmarks/mi_experiments.py comparison --out=/tmp/mi_comparison
    python benchmarks/mi_experiments.py comparison --config=configs/cifar100.py --out=...   # an accelerator
    python benchmarks/mi_experiments.py sdmi_study --out=/tmp/sdmi_study   # ~40 s a setting, 2-core CPU
    python benchmarks/mi_experiments.py tracking --config=configs/gaussian_mixture.py:cluster_views --out=...

* ``tracking`` (claim 1, MI rises near-monotonically under both paradigms): the canonical
  SDMI and JMI prototypes and the established methods, each trained on the config
  (default: the Gaussian mixture, configs/gaussian_mixture.py); per run and MI estimate
  (cos-DV, InfoNCE, JSD, Gaussian), Spearman's correlation with the step and the share of
  logging intervals in which it rose; the exact MI of the views where the data has one;
  cluster separation: kNN top-1 on the class (cluster) labels and the silhouette of the
  test features (cosine distance).
* ``ablation`` (claim 2, the marginal-term surrogates are necessary): each method beside
  its ablations (no_predictor, no_stop_gradient, no_regularizer); collapse read from the
  embedding std, the effective rank and kNN, each also as a ratio to the full method's.
* ``comparison`` (claim 3, the prototypes are competitive): SDMI and Taylor-DV beside
  SimSiam, SimCLR, Barlow Twins and EMMI on one schedule, kNN and the config's linear
  probe.
* ``sdmi_study`` (claim 1 for the canonical SDMI prototype, issue 21): the prototype
  under the settings that could make its own branches' MI rise or fall (the alternation
  period, the target's learning rate, the M-step's objective, the EMA stand-in); per
  setting the InfoNCE of the pair its critic scores (h(f(x_a)) against g(x_b)) and of the
  online encoder's two views, start / max / end, Spearman's rho with the step, and the
  effective ranks at the end. No evaluation after training; one figure of the curves
  (``sdmi_study.png``).

A config path may carry variants of its own after a colon, applied to every run (e.g.
``configs/gaussian_mixture.py:cluster_views``, the views that share only the cluster).

Every run trains in this process (``emim.train.run``) and is evaluated from its last
checkpoint (``emim.evaluate``); its work directory is OUT/runs/NAME. The table goes to
OUT/EXPERIMENT.md and OUT/EXPERIMENT.json, the figures (``emim.plots``) to OUT/figures/.
``--set KEY=VALUE`` overrides config fields of every run (e.g. --set train.num_steps=3000);
``--runlocal`` adds the config's runlocal variant (the CPU test of this script).
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import pathlib
import re
import sys
import time
from typing import NamedTuple

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

class Setting(NamedTuple):
  """One run of an experiment: its name (and work directory), the config variant and
  config overrides of its own (KEY=VALUE, as --set)."""

  name: str
  variant: str
  overrides: tuple[str, ...] = ()


# The canonical SDMI prototype as the paper writes it (-cos in both alternating steps,
# alternate_every=1: marginal_term=none) beside the settings the DV bound says could
# matter, each named by what it changes (BENCHMARKS.md, "The SDMI prototype examined").
_AS_WRITTEN = "method.marginal_term=none"
SDMI_STUDY = [
    Setting("prototype", "sdmi", (_AS_WRITTEN,)),
    Setting("every_10", "sdmi", (_AS_WRITTEN, "method.alternate_every=10")),
    Setting("every_100", "sdmi", (_AS_WRITTEN, "method.alternate_every=100")),
    Setting("target_lr_0.1", "sdmi", (_AS_WRITTEN, "method.target_lr_scale=0.1")),
    Setting("target_lr_0.01", "sdmi", (_AS_WRITTEN, "method.target_lr_scale=0.01")),
    Setting("ema", "sdmi", (_AS_WRITTEN, "method.target_update=ema")),
    Setting("m_step_dv", "sdmi", ("method.marginal_term=target_step",)),  # emim's default
    Setting("m_step_dv_every_10", "sdmi", ("method.marginal_term=target_step", "method.alternate_every=10")),
    Setting("both_steps_dv", "sdmi", ("method.marginal_term=both_steps",)),
]

EXPERIMENTS = {
    "sdmi_study": SDMI_STUDY,
    "tracking": ["sdmi", "taylor_dv", "byol", "simsiam", "barlow_twins", "simclr", "vicreg", "emmi"],
    "ablation": ["sdmi", "sdmi,no_predictor", "sdmi,no_stop_gradient", "byol", "byol,no_predictor", "simsiam",
                 "simsiam,no_predictor", "simsiam,no_stop_gradient", "taylor_dv", "taylor_dv,no_regularizer",
                 "vicreg", "vicreg,no_regularizer", "barlow_twins", "barlow_twins,no_regularizer"],
    "comparison": ["sdmi", "taylor_dv", "simsiam", "simclr", "barlow_twins", "emmi"],
}
ESTIMATES = ("mi_dv", "mi_infonce", "mi_jsd", "mi_gaussian")


def spearman(x, y) -> float:
  """Spearman's rank correlation (average ranks for ties); NaN for fewer than 3 points."""
  from scipy.stats import spearmanr

  if len(x) < 3:
    return float("nan")
  return float(spearmanr(x, y).statistic)


def rising_share(values) -> float:
  """The share of consecutive intervals in which the value rose."""
  values = np.asarray(values, float)
  return float(np.mean(np.diff(values) > 0)) if len(values) > 1 else float("nan")


def silhouette(features: np.ndarray, labels: np.ndarray) -> float:
  """The mean silhouette of the points under cosine distance: (b - a) / max(a, b), a the
  mean distance to the point's own class, b to the nearest other class."""
  f = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
  distance = 1.0 - f @ f.T
  classes = np.unique(labels)
  onehot = (labels[:, None] == classes[None]).astype(float)  # (n, C)
  counts = onehot.sum(0)
  mean_to = distance @ onehot / counts  # mean distance of each point to each class (self included)
  own = onehot.astype(bool)
  n_own = counts[np.searchsorted(classes, labels)]
  a = mean_to[own] * n_own / np.maximum(n_own - 1, 1)  # without the point itself (its distance is 0)
  b = np.where(own, np.inf, mean_to).min(1)
  s = np.where(n_own > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-12), 0.0)
  return float(s.mean())


def run_name(variant: str) -> str:
  return variant.replace(",", "-")


def as_setting(entry: str | Setting) -> Setting:
  """A variant of the method list as a Setting of its own name."""
  return entry if isinstance(entry, Setting) else Setting(run_name(entry), entry)


def curve(run, key: str) -> dict:
  """start, max, end, Spearman's rho with the step and the rising share of one logged series."""
  steps, values = run.series(key)
  if not len(values):
    return {}
  return {"start": float(values[0]), "max": float(values.max()), "end": float(values[-1]),
          "rho": spearman(steps, values), "rising": rising_share(values)}


def summarise_study(workdir: pathlib.Path) -> dict:
  """The study's row of one run: the InfoNCE of the critic's pair ("branch_") and of the
  online pair, each start / max / end / rho / rising, and the effective ranks at the end."""
  from emim import plots

  run = plots.load_run(workdir)
  row = {}
  for prefix, key in (("branch", "eval/branch_mi_infonce"), ("online", "eval/mi_infonce")):
    row.update({f"{prefix}_{k}": v for k, v in curve(run, key).items()})
  for key in ("effective_rank", "branch_effective_rank_online", "branch_effective_rank_target", "true_mi"):
    _, values = run.series(f"eval/{key}")
    row[key] = float(values[-1]) if len(values) else None
  return row


def summarise(workdir: pathlib.Path, evaluation: dict) -> dict:
  """The table row of one run from its metrics and evaluation."""
  from emim import plots

  run = plots.load_run(workdir)
  row = {}
  for key in ESTIMATES:
    steps, values = run.series(f"eval/{key}")
    row[f"{key}_first"], row[f"{key}_last"] = float(values[0]), float(values[-1])
    row[f"{key}_spearman"] = spearman(steps, values)
    row[f"{key}_rising"] = rising_share(values)
  for key in ESTIMATES:  # the pair the method's critic scores, where it is not the online pair
    steps, values = run.series(f"eval/branch_{key}")
    if len(values):
      row[f"branch_{key}_first"], row[f"branch_{key}_last"] = float(values[0]), float(values[-1])
      row[f"branch_{key}_spearman"] = spearman(steps, values)
  _, true_mi = run.series("eval/true_mi")
  row["true_mi"] = float(true_mi[-1]) if len(true_mi) else None
  for key in ("effective_rank", "embedding_std"):
    row[key] = float(run.series(f"eval/{key}")[1][-1])
  row.update({k: evaluation[k] for k in ("knn_top1_k20", "knn_top1_k200", "linear_top1") if k in evaluation})
  embedded = plots.run_embeddings(workdir, "test", 2000)
  if embedded is not None:
    features, _, labels, _ = embedded
    row["silhouette"] = silhouette(features, labels)
  return row


def _override(config, assignment: str) -> None:
  key, sep, text = assignment.partition("=")
  if not sep:
    raise SystemExit(f"--set {assignment!r}: write KEY=VALUE, e.g. train.num_steps=3000")
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  node = config
  *path, leaf = key.split(".")
  for p in path:
    node = node[p]
  node[leaf] = value


def run_experiment(experiment: str, config_path: str, out: pathlib.Path, settings: list[Setting], overrides: list[str],
                   runlocal: bool) -> list[dict]:
  from emim import evaluate, train
  from emim.config_base import load_config_file, validate, validate_eval

  path, _, config_variants = config_path.partition(":")
  rows = []
  for i, setting in enumerate(settings):
    name = setting.name
    print(f"[{i + 1}/{len(settings)}] {name}: training, then evaluating (runs/{name})", flush=True)
    workdir = out / "runs" / name
    variant = ",".join(v for v in (setting.variant, config_variants, "runlocal" if runlocal else "") if v)
    config = load_config_file(REPO / path if not os.path.isabs(path) else path, variant)
    with config.unlocked():
      for assignment in (*overrides, *setting.overrides):
        _override(config, assignment)
    validate(config)
    validate_eval(config)
    t0 = time.perf_counter()
    train.run(config, str(workdir))
    train_s = time.perf_counter() - t0
    if experiment == "sdmi_study":
      row = {"run": name, "settings": " ".join(setting.overrides) or "the config's defaults", "train_s": train_s,
             **summarise_study(workdir)}
      rows.append(row)
      print(f"{name}: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
            flush=True)
      continue
    evaluation = evaluate.evaluate(config, str(workdir))
    # The untrained network's kNN: the baseline every curve of knn.png is read against.
    baseline = evaluate.evaluate(config, str(workdir), mode="knn", random_init=True)
    row = {"run": name, "method": config.method.name, "steps": config.train.num_steps,
           "train_s": train_s, **summarise(workdir, evaluation), "knn_random_init": baseline["knn_top1_k20"]}
    rows.append(row)
    print(f"{name}: " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
          flush=True)
  if experiment == "ablation":
    full = {r["method"]: r for r in rows if r["run"] == r["method"]}
    for r in rows:
      base = full.get(r["method"])
      for key in ("embedding_std", "effective_rank", "knn_top1_k20"):
        if base is not None and key in r and base.get(key):
          r[f"{key}_vs_full"] = r[key] / base[key]
  return rows


COLUMNS = {
    "sdmi_study": [("run", "setting"), ("branch_start", "critic's pair start"), ("branch_max", "max"),
                   ("branch_end", "end"), ("branch_rho", "rho"), ("online_start", "online pair start"),
                   ("online_max", "max"), ("online_end", "end"), ("online_rho", "rho"),
                   ("effective_rank", "eff. rank f"), ("branch_effective_rank_online", "eff. rank h(f)"),
                   ("branch_effective_rank_target", "eff. rank g"), ("train_s", "train s")],
    "tracking": [("run", "run"), ("mi_infonce_first", "InfoNCE start"), ("mi_infonce_last", "InfoNCE end"),
                 ("mi_infonce_spearman", "InfoNCE rho"), ("mi_infonce_rising", "InfoNCE rising"),
                 ("mi_dv_last", "DV end"), ("mi_dv_spearman", "DV rho"), ("mi_jsd_spearman", "JSD rho"),
                 ("mi_gaussian_last", "Gaussian end"), ("mi_gaussian_spearman", "Gaussian rho"),
                 ("branch_mi_infonce_first", "critic's pair InfoNCE start"),
                 ("branch_mi_infonce_last", "InfoNCE end"), ("branch_mi_infonce_spearman", "InfoNCE rho"),
                 ("true_mi", "exact MI"), ("knn_top1_k20", "kNN k=20"), ("knn_random_init", "kNN random init"),
                 ("silhouette", "silhouette"),
                 ("effective_rank", "eff. rank"), ("train_s", "train s")],
    "ablation": [("run", "run"), ("embedding_std", "emb. std"), ("embedding_std_vs_full", "vs full"),
                 ("effective_rank", "eff. rank"), ("effective_rank_vs_full", "vs full"),
                 ("knn_top1_k20", "kNN k=20"), ("knn_top1_k20_vs_full", "vs full"), ("mi_infonce_last", "InfoNCE end"),
                 ("silhouette", "silhouette")],
    "comparison": [("run", "run"), ("knn_top1_k20", "kNN k=20"), ("knn_top1_k200", "kNN k=200"),
                   ("linear_top1", "linear top-1"), ("mi_infonce_last", "InfoNCE end"), ("effective_rank", "eff. rank"),
                   ("train_s", "train s")],
}


def markdown(experiment: str, rows: list[dict]) -> str:
  columns = COLUMNS[experiment]

  def cell(value):
    if value is None:
      return "-"
    if isinstance(value, float):
      return "nan" if np.isnan(value) else f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)

  lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(cell(r.get(key)) for key, _ in columns) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def write_study_figure(workdirs: list[str], path: pathlib.Path) -> pathlib.Path:
  """The study's figure: every setting's InfoNCE of the critic's pair and of the online
  pair over steps (``emim.plots.plot_pairs``), a small PNG."""
  from emim import plots

  fig = plots.plot_pairs([plots.load_run(w) for w in workdirs])
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, format="png", dpi=80)
  import matplotlib.pyplot as plt  # (plot_pairs chose the backend)

  plt.close(fig)
  return path


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("experiment", choices=sorted(EXPERIMENTS))
  parser.add_argument("--out", required=True, help="the tables, figures and run directories go here")
  parser.add_argument("--config", default="configs/gaussian_mixture.py")
  parser.add_argument("--methods", default="", help="comma-separated variants instead of the experiment's own "
                      "(ablations joined by '+', e.g. sdmi,sdmi+no_predictor)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override, repeatable")
  parser.add_argument("--runlocal", action="store_true", help="the config's runlocal variant (a CPU test)")
  args = parser.parse_args(argv)
  variants = [m.replace("+", ",") for m in args.methods.split(",") if m] or EXPERIMENTS[args.experiment]
  settings = [as_setting(v) for v in variants]
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  from emim.config_base import ConfigError

  try:
    rows = run_experiment(args.experiment, args.config, out, settings, args.set, args.runlocal)
  except ConfigError as e:  # a wrong variant or override: one line, not a traceback
    raise SystemExit(f"error: {e}") from None
  header = (f"{args.experiment}: {args.config}{' (runlocal)' if args.runlocal else ''}, "
            f"{' '.join('--set ' + s for s in args.set) or 'its own schedule'}\n\n")
  (out / f"{args.experiment}.md").write_text(header + markdown(args.experiment, rows))
  (out / f"{args.experiment}.json").write_text(json.dumps(rows, indent=1))
  from emim import plots

  workdirs = [str(out / "runs" / s.name) for s in settings]
  if args.experiment == "sdmi_study":
    written = [write_study_figure(workdirs, out / "figures" / "sdmi_study.png")]
  else:
    written = plots.write_all(workdirs, out / "figures")
  print(header + markdown(args.experiment, rows))
  print("figures:", ", ".join(p.name for p in written))
  return rows


def show_progress(stream=None, lines_a_run: int = 5) -> logging.Handler:
  """About ``lines_a_run`` of each run's progress lines ("step 300/1500 ... ETA ..."), and
  warnings, on ``stream`` (stderr): the runs log through Python's logging, which shows
  nothing below a warning without a handler (the programs' absl ``app.run`` installs
  one; this script has none), and every line of a run would be 30."""

  def shown(record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    m = PROGRESS_LINE.match(record.getMessage())
    return bool(m) and int(m[1]) % max(int(m[2]) // lines_a_run, 1) == 0

  handler = logging.StreamHandler(stream)
  handler.setFormatter(logging.Formatter("  %(asctime)s %(message)s", "%H:%M:%S"))
  handler.addFilter(shown)
  root = logging.getLogger()
  root.addHandler(handler)
  if root.level > logging.INFO:  # (NOTSET, 0, already passes everything)
    root.setLevel(logging.INFO)
  return handler


PROGRESS_LINE = re.compile(r"step (\d+)/(\d+) ")


if __name__ == "__main__":
  from emim import cli

  cli.cpu_without_accelerator()  # (as the emim programs do: no probe for a TPU that is not there)
  show_progress()
  main()
