"""The evaluation program: linear probe and kNN on a frozen backbone from a checkpoint.

    python -m emim.evaluate --workdir=runs/cifar10 [--checkpoint_step=N] [--mode=all|linear|knn]
    python -m emim.evaluate --workdir=runs/cifar10 --config.eval.probe_epochs=10 --config.eval.probe_mode=features
    python -m emim.evaluate --workdir=runs/cifar10 --random_init   # the untrained baseline

Only the backbone's params and batch statistics are read from the Orbax checkpoint
(the latest, or --checkpoint_step), so it runs beside a training job that is still
writing checkpoints, on any number of devices. The config is the one saved with that
checkpoint (the run's config.json for older checkpoints), any field of which
``--config.<field>=...`` overrides; a ``--config=FILE`` must describe the model the
checkpoint holds. Results are logged, then added to evaluation.json (keyed by step,
written whole) and to metrics_eval.jsonl (and TensorBoard when installed), in the work
directory or in ``--results_dir`` (for a run whose directory is read-only); only process
0 writes.
Re-running on the same checkpoint gives the same numbers. ``--random_init`` evaluates the
same architecture freshly initialised from the config's seed instead (random ResNet
features are well above chance on real images, so this is the baseline to read a
trained backbone against) and records it under "random_init"; it needs no checkpoint.
"""

from __future__ import annotations

import json
import sys
import time

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from emim import checkpoint as ckpt_lib
from emim import cli
from emim import fs, sharding, workdir as workdir_lib
from emim.backbone import (checkpoint_dir, features_and_labels, init_backbone, latest_run_config, load_run_config,
                           model_config_of, restore_backbone)
from emim.checkpoint import quiet_orbax_logs
from emim.config_base import ConfigError, validate_eval
from emim.data import sources, streaming
from emim.evaluators.knn import knn_accuracy
from emim.evaluators.linear_probe import linear_probe
from emim.metric_writer import MetricWriter

MODES = ("all", "linear", "knn")


def evaluate(config: ml_collections.ConfigDict, workdir: str, step: int | None = None, mode: str = "all",
             random_init: bool = False, results_dir: str | None = None, newest_if_deleted: bool | None = None) -> dict:
  """Evaluate one checkpoint of the run in ``workdir`` (or, with ``random_init``, the
  untrained backbone); returns (and records, in ``results_dir``, by default ``workdir``)
  the results. ``newest_if_deleted``: ``step`` stands for the latest (by default when it
  is None), so if the run still training deletes it first, the newest one is evaluated."""
  if mode not in MODES:
    raise ConfigError(f"Unknown --mode {mode!r}; choose one of {MODES}.")
  if random_init and step is not None:
    raise ConfigError("--random_init evaluates no checkpoint: drop --checkpoint_step.")
  validate_eval(config)
  workdir = fs.as_path(workdir)
  results_dir = fs.as_path(results_dir) if results_dir else workdir
  if workdir_lib.writes_files():  # before any work: the results must have somewhere to go
    fs.check_writable(results_dir, "the evaluation results", "Pass --results_dir=A_WRITABLE_DIR to keep them elsewhere.")
  t0 = time.perf_counter()
  if random_init:
    step, backbone = 0, init_backbone(model_config_of(config), config.seed)
  else:
    step, backbone = restore_backbone(workdir, config, step, newest_if_deleted)
  if config.data.stream:  # decoded on host workers batch by batch (ImageNet)
    train, test = streaming.stream_split(config.data, "train"), streaming.stream_split(config.data, "test")
  else:
    cache_dir = fs.local_cache_dir(workdir)
    train = sources.load(config.data, "train", cache_dir=cache_dir)
    test = sources.load(config.data, "test", cache_dir=cache_dir, train_classes=train.class_names)
  _warn_if_classes_changed(workdir, train.class_names)
  workers = config.data.workers if config.data.stream else 0
  mesh = sharding.make_mesh()
  results = {"step": step, "num_train": len(train), "num_test": len(test)}
  if random_init:
    results["random_init"] = True
  timings = {"load_s": time.perf_counter() - t0}
  # Centre-view features of both splits, extracted once: kNN uses them, and the probe
  # tests on them (and trains on them in its "features" mode).
  features = None
  if mode in ("all", "knn") or config.eval.probe_mode == "features":
    t = time.perf_counter()
    fn = backbone.features_fn()
    features = (features_and_labels(fn, train, config.eval.batch_size, mesh, workers),
                features_and_labels(fn, test, config.eval.batch_size, mesh, workers))
    timings["features_s"] = time.perf_counter() - t
  if mode in ("all", "knn"):
    t = time.perf_counter()
    (train_f, train_l), (test_f, test_l) = features
    results.update(knn_accuracy(train_f, train_l, test_f, test_l, train.num_classes,
                                tuple(config.eval.knn_k), config.eval.knn_temperature))
    timings["knn_s"] = time.perf_counter() - t
  if mode in ("all", "linear"):
    t = time.perf_counter()
    results.update(linear_probe(backbone, train, test, config.eval, config.eval.probe_mode, config.seed, mesh, workers,
                                features))
    results["linear_mode"] = config.eval.probe_mode
    results["linear_epochs"] = config.eval.probe_epochs
    timings["linear_s"] = time.perf_counter() - t
  results["timings"] = timings
  record(results_dir, results)
  return results


def _warn_if_classes_changed(workdir: fs.Path, class_names) -> None:
  """The probe and kNN number the classes the data has now; say so when those are not
  the classes the run trained on (a folder added or removed since)."""
  path = workdir / workdir_lib.CLASSES_FILE
  if not path.exists():
    return
  trained = json.loads(path.read_text()).get("train", [])
  if list(class_names) != list(trained):
    logging.warning("The training split's classes differ from those the run trained on (%s): added %s, removed %s. "
                    "The evaluation uses the classes there are now.", path,
                    sorted(set(class_names) - set(trained))[:5], sorted(set(trained) - set(class_names))[:5])


def record(directory: fs.Path, results: dict) -> None:
  """Log, then (process 0) merge into evaluation.json (keyed by step, or "random_init";
  written whole, so a reader never sees half of it) and append to metrics_eval.jsonl."""
  key = "random_init" if results.get("random_init") else str(results["step"])
  logging.info("Evaluation of %s: %s", "the random initialisation" if key == "random_init" else f"step {key}",
               " ".join(f"{k}={v:.4f}" for k, v in results.items() if isinstance(v, float)))
  if not workdir_lib.writes_files():
    return
  directory.mkdir(parents=True, exist_ok=True)
  # Merged into the step's entry: a later --mode=knn keeps the same step's probe results.
  def merge(table):
    entry = table.setdefault(key, {})
    timings = {**entry.get("timings", {}), **results.get("timings", {})}
    entry.update(results)
    entry["timings"] = timings

  workdir_lib.update_json(directory / "evaluation.json", merge)
  writer = MetricWriter(directory, "metrics_eval.jsonl")
  prefix = "eval/random_init/" if results.get("random_init") else "eval/"
  writer.write(results["step"], {prefix + k: v for k, v in results.items() if isinstance(v, float)})
  writer.close()


def _flag_values(argv: list[str], name: str) -> list[str]:
  """Values of ``--name=V`` and ``--name V`` in ``argv`` (flags are not parsed yet)."""
  values = [arg.split("=", 1)[1] for arg in argv if arg.startswith(f"--{name}=")]
  return values + [value for flag, value in zip(argv, argv[1:]) if flag == f"--{name}"]


# The checkpoint whose config define_config_flag took, so that main evaluates that one
# (training beside may save a newer checkpoint meanwhile).
_CONFIG_STEP: int | None = None


def define_config_flag(argv: list[str]) -> None:
  """--config: a config file, or by default the config saved with the checkpoint to
  evaluate (the run's config.json for older checkpoints), so that
  ``--config.eval.probe_epochs=10`` alone overrides a field of what the run trained with
  (the flag's default must exist before the command line is parsed). A --workdir that
  holds neither is reported now, before the overrides would be taken for unknown flags."""
  global _CONFIG_STEP
  cli.check_flagfiles(argv)  # the config flag reads them as it is defined: a bad one is one line, not a traceback
  quiet_orbax_logs()  # reading the checkpoint's config opens Orbax before main
  file_given = any(arg == "--config" or arg.startswith("--config=") for arg in argv)
  workdirs, steps = _flag_values(argv, "workdir"), _flag_values(argv, "checkpoint_step")
  if file_given or not workdirs:
    config_flags.DEFINE_config_file("config", None, "Config file; default: the checkpoint's own config.", lock_config=True)
    return
  if steps and not steps[-1].lstrip("-").isdigit():
    cli.fail(f"--checkpoint_step={steps[-1]!r}: give a step number (-1, the default, for the latest).")
  try:
    step = int(steps[-1]) if steps and int(steps[-1]) >= 0 else None
    if step is None and "--random_init" not in argv:
      step, config = latest_run_config(workdirs[-1])
    else:
      config = load_run_config(workdirs[-1], step)
  except Exception as e:  # a missing run, an unreadable checkpoint, an unreachable bucket
    message = cli.explain(e)
    if message is None:
      raise
    cli.fail(message, status=1)
  _CONFIG_STEP = step
  config.lock()
  try:  # the overrides on the command line apply as the flag is defined
    config_flags.DEFINE_config_dict("config", config, "The checkpoint's own config; override any field.")
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    cli.config_override_failed(argv, e)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  quiet_orbax_logs()
  FLAGS = flags.FLAGS
  step = None if FLAGS.checkpoint_step < 0 else FLAGS.checkpoint_step
  config = FLAGS.config if FLAGS.config is not None else load_run_config(FLAGS.workdir, step)
  if config.train.get("deterministic", False):
    # The probe trains with SGD on the GPU too: deterministic kernels make a re-run on the
    # same checkpoint give the same numbers there. Acts only before JAX starts.
    from emim.train import use_deterministic_gpu_ops
    use_deterministic_gpu_ops()
  latest = step is None
  if latest and not FLAGS.random_init:  # the one whose config was read; else the latest now
    step = _CONFIG_STEP if _CONFIG_STEP is not None else ckpt_lib.latest_step(checkpoint_dir(FLAGS.workdir))
  evaluate(config, FLAGS.workdir, step, FLAGS.mode, FLAGS.random_init, FLAGS.results_dir, newest_if_deleted=latest)


if __name__ == "__main__":
  # Flags are defined only when run as a program, so importing this module (tests,
  # notebooks, emim.export) defines none. Reading the checkpoint's config for the flag
  # starts JAX (Orbax), so the CPU-only choice comes first: else libtpu's probe for a TPU
  # prints its errors on every CPU evaluation.
  cli.cpu_without_accelerator()
  define_config_flag(sys.argv)
  flags.DEFINE_string("workdir", None, "The training run's work directory.")
  flags.DEFINE_integer("checkpoint_step", -1, "Checkpoint step to evaluate; -1 for the latest.")
  flags.DEFINE_enum("mode", "all", MODES, "Which evaluations to run.")
  flags.DEFINE_bool("random_init", False, "Evaluate the untrained backbone (the config's seed), the baseline.")
  flags.DEFINE_string("results_dir", None, "Where to record the results; default: --workdir.")
  flags.mark_flags_as_required(["workdir"])
  cli.run(main)
