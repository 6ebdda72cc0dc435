"""Pre-training variants side by side: each trained for the same short schedule, then
evaluated from its last checkpoint (kNN, and a linear probe on centre features); one
table at the end.

    python benchmarks/cifar_sweep.py --data=.accel/cifar10-jpeg.tar.gz --epochs=20 --parallel=4 \\
        --variant='emmi=' --variant='byol=:byol' \\
        --variant='emmi_trace= --config.method.rescale=trace'

A variant is ``NAME=[:CONFIG_ARG] [OVERRIDES...]``: CONFIG_ARG goes after the config file
(``configs/cifar10.py:byol``), the overrides go to both programs (training and
evaluation read the same model fields). Up to --parallel runs share the accelerator, each
with its share of the memory, so that one run's compilation and evaluation overlap
another's training: their pairs/s are therefore not speed figures; the table is for
comparing accuracy. Logs, metrics and evaluation.json of each run go to OUT/NAME/, the
table to OUT/sweep.md and OUT/sweep.json.

CPU check of the script: python benchmarks/cifar_sweep.py --config=configs/synthetic.py \\
    --variant='a=:runlocal' --variant='b=:byol,runlocal' --out=/tmp/sweep
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def parse_variant(text: str) -> tuple[str, str, list[str]]:
  """'name=:arg --config.a=b' -> ('name', ':arg', ['--config.a=b'])."""
  name, sep, rest = text.partition("=")
  if not sep or not name:
    raise SystemExit(f"--variant {text!r}: write NAME=[:CONFIG_ARG] [OVERRIDES...]")
  words = shlex.split(rest)
  arg = words.pop(0) if words and words[0].startswith(":") else ""
  return name, arg, words


def run_logged(cmd: list[str], log: pathlib.Path, env: dict, limit_s: float | None) -> int:
  """Runs cmd with its output in log; past limit_s it gets SIGTERM (training then saves
  a checkpoint and stops, so there is still something to evaluate)."""
  with open(log, "w") as f:
    f.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
    f.flush()
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    try:
      return proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
      proc.send_signal(signal.SIGTERM)
      try:
        return proc.wait(timeout=120)
      except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def last_rows(metrics: pathlib.Path) -> tuple[dict, dict]:
  """The last training row (with a loss) and the last tracker row (eval/*) of a run."""
  train, tracker = {}, {}
  if metrics.exists():
    for line in metrics.read_text().splitlines():
      row = json.loads(line)
      if "loss" in row:
        train = row
      if any(k.startswith("eval/") for k in row):
        tracker = row
  return train, tracker


def run_variant(name, arg, overrides, args, env) -> dict:
  out = pathlib.Path(args.out) / name
  out.mkdir(parents=True, exist_ok=True)
  workdir = pathlib.Path(args.workroot) / name
  shutil.rmtree(workdir, ignore_errors=True)
  common = [f"--config={args.config}{arg}", *args.common, *overrides]
  train = [sys.executable, "-m", "emim.main", *common, f"--workdir={workdir}"]
  if args.epochs:
    train += [f"--config.train.num_epochs={args.epochs}", f"--config.optim.warmup_epochs={args.warmup_epochs}"]
  start = time.perf_counter()
  train_rc = run_logged(train, out / "train.log", env, args.train_limit_s or None)
  train_s = time.perf_counter() - start
  evaluate = [sys.executable, "-m", "emim.evaluate", *common, f"--workdir={workdir}",
              "--config.eval.probe_mode=features", f"--config.eval.probe_epochs={args.probe_epochs}"]
  start = time.perf_counter()
  eval_rc = run_logged(evaluate, out / "evaluate.log", env, None) if (workdir / "checkpoints").exists() else -1
  eval_s = time.perf_counter() - start
  for f in ("metrics.jsonl", "timings.json", "evaluation.json"):
    if (workdir / f).exists():
      shutil.copy(workdir / f, out / f)
  evaluation = json.loads((out / "evaluation.json").read_text()) if (out / "evaluation.json").exists() else {}
  result = max((v for k, v in evaluation.items() if k.isdigit()), key=lambda v: v["step"], default={})
  train_row, tracker = last_rows(out / "metrics.jsonl")
  return dict(name=name, arg=arg, overrides=overrides, train_rc=train_rc, eval_rc=eval_rc,
              train_wall_s=round(train_s, 1), eval_wall_s=round(eval_s, 1), step=train_row.get("step"),
              loss=train_row.get("loss"), probe_acc=train_row.get("probe_acc"),
              effective_rank=tracker.get("eval/effective_rank"), mi_infonce=tracker.get("eval/mi_infonce"),
              mi_gaussian=tracker.get("eval/mi_gaussian"),
              knn_k20=result.get("knn_top1_k20"), knn_k200=result.get("knn_top1_k200"),
              linear_top1=result.get("linear_top1"))


def table(rows: list[dict]) -> str:
  cols = ["name", "step", "loss", "probe_acc", "effective_rank", "mi_infonce", "knn_k20", "knn_k200", "linear_top1",
          "train_wall_s", "train_rc"]
  fmt = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
  lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default="configs/cifar10.py")
  p.add_argument("--data", default="", help="the dataset path (config.data.path) of every variant")
  p.add_argument("--variant", action="append", required=True)
  p.add_argument("--epochs", type=int, default=0, help="train.num_epochs of every variant; 0 keeps the config's")
  p.add_argument("--warmup_epochs", type=int, default=2)
  p.add_argument("--probe_epochs", type=int, default=100)
  p.add_argument("--parallel", type=int, default=1)
  p.add_argument("--train_limit_s", type=float, default=0, help="SIGTERM a training run after this long; 0: no limit")
  p.add_argument("--out", default=os.environ.get("OUT", "/tmp/emim_sweep"))
  p.add_argument("--workroot", default="/tmp/emim_sweep_runs")
  p.add_argument("--set", action="append", default=[], help="another override for every variant (--set=--config.a=b)")
  args = p.parse_args()
  args.common = ([f"--config.data.path={pathlib.Path(args.data).resolve()}"] if args.data else []) + args.set
  variants = [parse_variant(v) for v in args.variant]
  if len({v[0] for v in variants}) != len(variants):
    raise SystemExit("variant names must differ: they name the output folders")
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
  if args.parallel > 1:  # each process takes its share of the accelerator's memory, not 75%
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / args.parallel:.3f}")
  pathlib.Path(args.out).mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
    futures = [pool.submit(run_variant, *v, args, env) for v in variants]
    rows = []
    for future in futures:
      rows.append(future.result())
      print(f"[{time.perf_counter() - start:.0f}s] {json.dumps(rows[-1])}", flush=True)
  md = table(rows)
  print(md)
  (pathlib.Path(args.out) / "sweep.md").write_text(md + "\n")
  (pathlib.Path(args.out) / "sweep.json").write_text(json.dumps(rows, indent=1))
  print(f"sweep wall clock: {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
  main()
