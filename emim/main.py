"""Entry point: python -m emim.main --config=configs/synthetic.py --workdir=/tmp/run

Any config field can be overridden (``--config.train.batch_size=512``); unknown fields
are rejected. ``--print_config`` prints the resolved config, every field with what it does
and the code's comments on it, and exits without training (emim/config_doc.py). Several
processes (a TPU pod, a multi-host GPU job) call ``jax.distributed.initialize()`` first.
"""

import sys

from absl import app, flags, logging

from emim import cli
from ml_collections import config_flags

cli.check_flagfiles(sys.argv)  # read as the config flag is defined, next: a bad one is one line, not a traceback
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/cifar10.py[:variant].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host runs).")
# Detected by JAX on Cloud TPU, Slurm, Open MPI and Kubernetes; set them elsewhere.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "With --distributed: host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --distributed: how many processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --distributed: this process's index.")
_STOP_AT_STEP = flags.DEFINE_integer(
    "stop_at_step", None, "Stop with a checkpoint after this step (a job under a time limit); the schedule stays "
    "that of the whole run, and the same command without it resumes.")
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print the config (variants and --config.x=y overrides applied), every field with what it "
    "does and the code's comments on it, and exit without training.")
flags.mark_flags_as_required(["config"])
flags.register_multi_flags_validator(
    ["workdir", "print_config"], lambda f: f["workdir"] is not None or f["print_config"],
    "--workdir is required: the run's directory (checkpoints, metrics.jsonl), e.g. --workdir=runs/x")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _PRINT_CONFIG.value:  # before JAX is imported: this prints and exits at once
    from emim import config_doc

    config_arg = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "")
    overrides = [a for a in sys.argv if a.startswith("--config.")]
    print(config_doc.describe(_CONFIG.value, config_flags.get_config_filename(flags.FLAGS["config"]),
                              " ".join([config_arg, *overrides])), end="")
    return
  import jax

  from emim import train
  from emim.checkpoint import quiet_orbax_logs

  quiet_orbax_logs()
  # Both act only before JAX starts its backends, which nothing imported so far does.
  if _CONFIG.value.train.deterministic:
    train.use_deterministic_gpu_ops()
  if _DISTRIBUTED.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)

  logging.info("JAX %s on %d %s device(s), process %d of %d.", jax.__version__, jax.device_count(),
               jax.default_backend(), jax.process_index(), jax.process_count())
  if jax.default_backend() == "tpu":
    from emim.tpu import libtpu_advice, libtpu_in_use

    advice = libtpu_advice(jax.devices()[0].device_kind, libtpu_in_use()[0])
    if advice:
      logging.warning(advice)
  # A second Ctrl-C ends the process at once (the first asks for a checkpoint and a stop).
  result = train.run(_CONFIG.value, _WORKDIR.value, stop_at_step=_STOP_AT_STEP.value, second_signal_ends_process=True)
  if result.stopped_by_signal is not None:
    # The shell's convention for a process ended by a signal, so schedulers see a stop,
    # not a finished job (the checkpoint is saved: the same command resumes).
    sys.exit(128 + result.stopped_by_signal)


if __name__ == "__main__":
  cli.run(main)
