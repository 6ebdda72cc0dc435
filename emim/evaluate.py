"""The evaluation program: linear probe and kNN on a frozen backbone from a checkpoint.

    python -m emim.evaluate --workdir=runs/cifar10 [--checkpoint_step=N] [--mode=all|linear|knn]
    python -m emim.evaluate --workdir=runs/cifar10 --config.eval.probe_epochs=10 --config.eval.probe_mode=features
    python -m emim.evaluate --workdir=runs/cifar10 --random_init   # the untrained baseline

Only the backbone's params and batch statistics are read from the Orbax checkpoint
(the latest, or --checkpoint_step), so it runs beside a training job that is still
writing checkpoints, on any number of devices. The config is the run's own config.json,
any field of which ``--config.<field>=...`` overrides; a ``--config=FILE`` must describe
the model the run trained. Results are added to evaluation.json in the work directory
(keyed by step), to metrics_eval.jsonl (and TensorBoard when installed), and to the log.
Re-running on the same checkpoint gives the same numbers. ``--random_init`` evaluates the
same architecture freshly initialised from the config's seed instead (random ResNet
features are well above chance on real images, so this is the baseline to read a
trained backbone against) and records it under "random_init"; it needs no checkpoint.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from emim import sharding
from emim.backbone import features_and_labels, init_backbone, load_run_config, model_config_of, restore_backbone
from emim.checkpoint import quiet_orbax_logs
from emim.data import sources, streaming
from emim.evaluators.knn import knn_accuracy
from emim.evaluators.linear_probe import linear_probe
from emim.metric_writer import MetricWriter

MODES = ("all", "linear", "knn")


def evaluate(config: ml_collections.ConfigDict, workdir: str, step: int | None = None, mode: str = "all",
             random_init: bool = False) -> dict:
  """Evaluate one checkpoint of the run in ``workdir`` (or, with ``random_init``, the
  untrained backbone); returns (and records) the results."""
  if mode not in MODES:
    raise ValueError(f"Unknown --mode {mode!r}; choose one of {MODES}.")
  if random_init and step is not None:
    raise ValueError("--random_init evaluates no checkpoint: drop --checkpoint_step.")
  workdir = pathlib.Path(workdir)
  t0 = time.perf_counter()
  if random_init:
    step, backbone = 0, init_backbone(model_config_of(config), config.seed)
  else:
    step, backbone = restore_backbone(workdir, config, step)
  if config.data.stream:  # decoded on host workers batch by batch (ImageNet)
    train, test = streaming.stream_split(config.data, "train"), streaming.stream_split(config.data, "test")
  else:
    cache_dir = str(workdir.absolute().parent / ".emim_cache")
    train = sources.load(config.data, "train", cache_dir=cache_dir)
    test = sources.load(config.data, "test", cache_dir=cache_dir)
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
  record(workdir, results)
  return results


def record(workdir: pathlib.Path, results: dict) -> None:
  """Merge into evaluation.json (keyed by step, or "random_init"), append to
  metrics_eval.jsonl, log."""
  key = "random_init" if results.get("random_init") else str(results["step"])
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / "evaluation.json"
  table = json.loads(path.read_text()) if path.exists() else {}
  table[key] = results
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(table, indent=2, sort_keys=True))
  tmp.replace(path)
  writer = MetricWriter(workdir, "metrics_eval.jsonl")
  prefix = "eval/random_init/" if results.get("random_init") else "eval/"
  writer.write(results["step"], {prefix + k: v for k, v in results.items() if isinstance(v, float)})
  writer.close()
  logging.info("Evaluation of %s: %s", "the random initialisation" if key == "random_init" else f"step {key}",
               " ".join(f"{k}={v:.4f}" for k, v in results.items() if isinstance(v, float)))


def define_config_flag(argv: list[str]) -> None:
  """--config: a config file, or by default the run's own config.json, so that
  ``--config.eval.probe_epochs=10`` alone overrides a field of what the run trained with
  (the flag's default must exist before the command line is parsed)."""
  file_given = any(arg == "--config" or arg.startswith("--config=") for arg in argv)
  workdirs = [arg.split("=", 1)[1] for arg in argv if arg.startswith("--workdir=")]
  workdirs += [value for flag, value in zip(argv, argv[1:]) if flag == "--workdir"]
  if not file_given and workdirs and (pathlib.Path(workdirs[-1]) / "config.json").exists():
    config = load_run_config(workdirs[-1])
    config.lock()
    config_flags.DEFINE_config_dict("config", config, "The run's config.json; override any field.")
  else:
    config_flags.DEFINE_config_file("config", None, "Config file; default: the run's config.json.", lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  quiet_orbax_logs()
  FLAGS = flags.FLAGS
  # Without a config.json in --workdir and without --config, load_run_config names the fix.
  config = FLAGS.config if FLAGS.config is not None else load_run_config(FLAGS.workdir)
  if config.train.get("deterministic", False):
    # The probe trains with SGD on the GPU too: deterministic kernels make a re-run on the
    # same checkpoint give the same numbers there. Acts only before JAX starts.
    from emim.train import use_deterministic_gpu_ops
    use_deterministic_gpu_ops()
  evaluate(config, FLAGS.workdir, None if FLAGS.checkpoint_step < 0 else FLAGS.checkpoint_step, FLAGS.mode,
           FLAGS.random_init)


if __name__ == "__main__":
  # Flags are defined only when run as a program, so importing this module (tests,
  # notebooks, emim.export) defines none.
  define_config_flag(sys.argv)
  flags.DEFINE_string("workdir", None, "The training run's work directory.")
  flags.DEFINE_integer("checkpoint_step", -1, "Checkpoint step to evaluate; -1 for the latest.")
  flags.DEFINE_enum("mode", "all", MODES, "Which evaluations to run.")
  flags.DEFINE_bool("random_init", False, "Evaluate the untrained backbone (the config's seed), the baseline.")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
