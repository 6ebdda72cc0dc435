"""The command line: ``python -m emim.aot --config=CONFIG --target=TARGET [--batch=N]
[--max_batch] [--breakdown] [--programs=train,mi,features,probe,model]
[--config.field=value ...]``.

It takes the config and its overrides exactly as ``emim.main`` does (ml_collections'
config flags), so what is compiled is the run that will be launched. For each program,
a row of the table (emim/aot/report.py); a program the compiler rejects, or that does not
fit, is its row's one line. The compiles run in a child process (emim/aot/supervisor.py).
``--max_batch`` also finds the largest global batch whose train step fits (a multiple of
8 per device, at most the training set; emim/aot/search.py). ``--breakdown`` prints the
step's FLOPs piece by piece (online encoder, target, predictor, objective, probe,
augmentation, optimiser) beside the ``model`` row's, from lowered programs, then the bytes
the compiled train step reads and writes per device, piece by piece (emim/aot/pieces.py),
beside the ``model`` row's; with it the programs default to ``train,model``.
"""

from __future__ import annotations

import os
import signal
import sys
import types

import emim.aot  # noqa: F401  (its __doc__ is the usage --help prints)
from absl import flags
from ml_collections import config_flags

from emim import cli as emim_cli
from emim.aot.programs import PROGRAMS
from emim.aot.supervisor import _STATUS, config_args, supervise
from emim.aot.targets import GPUS, TPUS, CUDA_PLUGIN_ADVICE, cuda_plugin_installed, memory_pool, parse_target
from emim.errors import UserError

ALL_PROGRAMS = PROGRAMS + ("model",)


def _define(fv: flags.FlagValues, argv: list[str]) -> None:
  # The overrides are read off ``argv`` (ml_collections reads sys.argv unless told).
  config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/cifar10.py[:variant].",
                                  flag_values=fv, lock_config=True, sys_argv=argv)
  flags.DEFINE_string("target", None, f"A TPU slice ({', '.join(TPUS)}: e.g. v5e:2x4, v4:2x2x1, v5e:8x8) or GPUs "
                      f"({', '.join(GPUS)}: e.g. h100:8, one host of 8; h100:2x8, two hosts).", flag_values=fv)
  flags.DEFINE_alias("topology", "target", flag_values=fv)  # benchmarks/tpu_compile.py's name for it
  flags.DEFINE_integer("batch", 0, "Global batch (default: the config's).", flag_values=fv)
  flags.DEFINE_list("programs", list(PROGRAMS), f"Programs to compile, of {','.join(ALL_PROGRAMS)}.", flag_values=fv)
  flags.DEFINE_bool("max_batch", False, "Also find the largest global batch whose train step fits.", flag_values=fv)
  flags.DEFINE_bool("breakdown", False, "Also the step's FLOPs (lowered) and its bytes per device (compiled) piece by "
                    "piece, beside the model row's; the programs default to train,model.", flag_values=fv)
  flags.DEFINE_bool("no_header", False, "(a child after a crash)", flag_values=fv)
  flags.mark_flags_as_required(["config", "target"], flag_values=fv)


def _flagfiles_joined(argv: list[str]) -> list[str]:
  """``--flagfile FILE`` as ``--flagfile=FILE``: absl reads both, and the compiling child
  (supervisor._child_argv) is passed the flagfiles by the second form."""
  out, k = [], 0
  while k < len(argv):
    if argv[k] in ("--flagfile", "-flagfile") and k + 1 < len(argv):
      out.append(f"--flagfile={argv[k + 1]}")
      k += 2
    elif argv[k].startswith("-flagfile="):  # absl's one-dash form: the child is passed "--flagfile=" ones
      out.append(f"-{argv[k]}")
      k += 1
    else:
      out.append(argv[k])
      k += 1
  return out


def parse_args(argv: list[str]) -> types.SimpleNamespace:
  """The command line's arguments (``argv`` without the program's name), read: a mistake is
  one line on stderr and exit status 2."""
  emim_cli.check_flagfiles(list(argv))
  argv = _flagfiles_joined(list(argv))
  fv = flags.FlagValues()
  _define(fv, ["emim.aot", *argv])
  if any(a in ("-h", "-?", "--help", "--helpshort", "--helpfull") for a in argv):  # flags of its own, not absl's app
    usage = "\n\n".join(emim.aot.__doc__.strip().split("\n\n")[:2])  # what it does, and examples
    print(f"{usage}\n\nAny --config.field=value overrides the config as for emim.main. Flags (docs/aot.md):\n"
          f"{fv.get_help(include_special_flags=False)}")
    sys.exit(0)
  rest = emim_cli.parse_flags(["emim.aot", *argv], fv)
  if len(rest) > 1:
    emim_cli.fail(f"unexpected arguments: {' '.join(rest[1:])} (--config.field=value sets a config field)")
  # Each program once, in the order given ("train,train" compiles it once; "train," is "train").
  programs = list(dict.fromkeys(p for p in fv.programs if p))
  bad = [p for p in programs if p not in ALL_PROGRAMS]
  if bad or not (programs or fv.max_batch or fv.breakdown):
    emim_cli.fail(f"--programs: name {'at least one' if not bad else 'only programs'} of {','.join(ALL_PROGRAMS)}"
                  f"{' (not ' + ','.join(bad) + ')' if bad else ''}.")
  if fv.batch < 0:
    emim_cli.fail(f"--batch={fv.batch}: give a positive global batch (or leave --batch out for the config's).")
  if fv.breakdown and not fv["programs"].present:
    programs = ["train", "model"]
  given = config_args(argv)  # --config=FILE or --config FILE, and the overrides, as written
  k = next((k for k, a in enumerate(given) if a == "--config" or a.startswith("--config=")), None)
  if k is None:  # given in a --flagfile: named by it
    config_arg, overrides = " ".join(a for a in argv if a.startswith("--flagfile=")), given
  elif given[k] == "--config":
    config_arg, overrides = given[k + 1], given[:k] + given[k + 2:]
  else:
    config_arg, overrides = given[k].split("=", 1)[1], given[:k] + given[k + 1:]
  return types.SimpleNamespace(config=fv.config, config_arg=config_arg, overrides=overrides, target=fv.target,
                               batch=fv.batch, programs=programs, max_batch=fv.max_batch, breakdown=fv.breakdown,
                               no_header=fv.no_header, argv=list(argv))


def check_target(text: str) -> None:
  """The target read, and its compiler installed, before any compile (UserError)."""
  spec = parse_target(text)
  if spec.platform == "cuda" and not cuda_plugin_installed():
    raise UserError(f"--target={text}: {CUDA_PLUGIN_ADVICE}.")
  memory_pool(spec.chip)  # a GPU pool's share set wrongly in the environment: said before any compile


def check_config(args) -> None:
  """The config with its overrides and --batch refused where emim.main and emim.evaluate
  would refuse it (ConfigError), before any compile: what is compiled is a run that can start."""
  from emim import config_base
  from emim.aot.programs import known_train_examples, not_built, with_batch

  config = with_batch(args.config, args.batch)
  config_base.validate(config)
  config_base.validate_eval(config)
  if args.breakdown and not_built(config, "model"):
    raise UserError(f"--breakdown: each piece is read against the model row, and {not_built(config, 'model')} "
                    "(--programs=train compiles the step).")
  n_train = known_train_examples(config)  # (an image folder's is counted by the run: not refused here)
  if n_train is not None and config.train.batch_size > n_train:  # as emim.main refuses it (an epoch with no step)
    raise config_base.ConfigError(f"The training set has {n_train} examples, fewer than one batch of "
                                  f"{config.train.batch_size}: lower --batch (or --config.train.batch_size).")


def compile_and_print(args) -> int:
  """In the compiling child: the header, the breakdown, the table, the batch search."""
  import jax

  from emim.aot.programs import flops_breakdown, not_built, num_train_examples, with_batch
  from emim.aot.report import compile_config, footnotes, table_header, table_row
  from emim.aot.search import max_batch
  from emim.aot.targets import memory_pool, target_devices
  from emim.tpu import libtpu_advice

  # XLA reads XLA_FLAGS as its CPU client starts, and ends the process at a flag it does not know with a line
  # naming it: here, before the header and the table's, that line is all that is printed.
  jax.devices("cpu")
  config = with_batch(args.config, args.batch)
  target = target_devices(args.target)
  n, unit = len(target.devices), target.unit
  if config.train.batch_size % n:
    raise UserError(f"The global batch {config.train.batch_size} does not split over the {n} {unit}s of "
                    f"{target.name}: --batch {max(n, config.train.batch_size - config.train.batch_size % n)} would.")
  if not args.no_header:
    overrides = " ".join(args.overrides)
    print(f"{args.config_arg}{' ' + overrides if overrides else ''} on {target.name} ({args.target}: {n} {unit}s, "
          f"{target.hosts} host(s), {target.devices[0].device_kind}); batch {config.train.batch_size} "
          f"({config.train.batch_size // n} per {unit}), {config.model.backbone} {config.model.dtype}; "
          f"jax {jax.__version__}, {target.compiler}. Memory and FLOPs are the compiler's estimates, not timings.",
          flush=True)
    share, why = memory_pool(target.chip)
    if why:
      print(f"A program fits where it needs at most {share * target.chip.hbm_gib:.3g} GiB per {unit}, {share:.0%} of "
            f"its {target.chip.hbm_gib:.3g} ({why}).", flush=True)
    if target.spec.platform == "tpu":
      advice = libtpu_advice(target.devices[0].device_kind, target.compiler.split()[-1])
      if advice:
        print(f"Known: {advice}", file=sys.stderr, flush=True)
  if args.breakdown:
    pieces = flops_breakdown(config)
    model = pieces["model row (network fwd+bwd, two views)"]
    print("| piece of the step (global, before fusion) | GFLOP | / model row |\n|---|---|---|")
    for name, value in pieces.items():
      print(f"| {name} | {value / 1e9:.1f} | {value / model:.3f} |")
    rest = pieces["whole step"] - sum(v for k, v in pieces.items()
                                      if k not in ("whole step", "model row (network fwd+bwd, two views)"))
    print(f"| rest (whole - pieces) | {rest / 1e9:.1f} | |", flush=True)
  if not args.no_header and args.programs:
    print(table_header(unit), flush=True)
  # Asked for, and not in the run: its row says why (it is no failure); before the compiles, which a compiler's crash
  # ends (the supervisor's next child is given only the programs after the one that died).
  for program in args.programs:
    if not_built(config, program):
      print(f"| {program} | not built: {not_built(config, program)} |", flush=True)
  reports = compile_config(config, target, tuple(args.programs), each=lambda r: print(table_row(r, target), flush=True)) \
      if args.programs else []
  for line in footnotes(reports):
    print(line, flush=True)
  if args.breakdown:
    print_bytes_by_piece(reports, unit)
  if args.max_batch:
    print(f"Largest global batch whose train step fits (a multiple of 8 per {unit}):", flush=True)
    best = max_batch(config, target, 8 * n, next((r for r in reports if r.program == "train"), None))
    whole = best == num_train_examples(config) // (8 * n) * (8 * n)
    print(f"max_batch {best} ({best // n} per {unit}) on {target.name}"
          f"{' (the whole training set: no larger batch tried)' if whole else ''}", flush=True)
  return 1 if any(r.error for r in reports) else 0


def print_bytes_by_piece(reports, unit: str) -> None:
  """The compiled train step's bytes per device piece by piece (emim/aot/pieces.py),
  beside the compiled ``model`` row's, where both compiled."""
  from emim.aot.pieces import bytes_by_piece, ordered

  by_name = {r.program: r for r in reports if not r.error and r.hlo}
  if "train" not in by_name:
    asked = any(r.program == "train" for r in reports)
    print("No bytes by piece: " + ("the train step did not compile here (or its text could not be read)." if asked else
                                   "--programs has no train (add it, or leave --programs out: --breakdown then "
                                   "compiles train,model)."), flush=True)
    return
  train, model = by_name["train"], by_name.get("model")
  every, main = bytes_by_piece(train.hlo)
  model_every, model_main = (sum(c.values()) for c in bytes_by_piece(model.hlo)) if model is not None else (0, 0)
  ratio = lambda b: f"{b / model_main:.3g}" if model_main else ""
  gb = lambda b: f"{b / 1e9:.3g}"  # three figures: a small program's pieces are MBs
  print(f"| piece of the compiled train step | GB per {unit}, every memory | GB per {unit}, main memory | "
        "/ model row's main memory |\n|---|---|---|---|")
  for name, value in ordered(every):
    print(f"| {name} | {gb(value)} | {gb(main[name])} | {ratio(main[name])} |")
  total, total_main = sum(every.values()), sum(main.values())
  print(f"| the train step | {gb(total)} | {gb(total_main)} | {ratio(total_main)} |")
  if model is not None:
    print(f"| the model row (the backbone's fwd+bwd of two views with a 2048-2048-2048 projector, Barlow Twins, SGD: "
          f"benchmarks/train_step.py) | {gb(model_every)} | {gb(model_main)} | 1.000 |")
  costs = [f"train {train.bytes_accessed / 1e9:.2f} GB"] if train.bytes_accessed else []
  costs += [f"model {model.bytes_accessed / 1e9:.2f} GB"] if model is not None and model.bytes_accessed else []
  print("Each instruction's operands and results as laid out (tiles padded), a loop's body per trip, summed by the "
        "step's named scopes (an unnamed copy or prefetch by the instruction that uses it); main memory: what is not "
        f"in an on-chip memory. The compiler's own totals: {', '.join(costs) or 'none'} (a loop's body counted once). "
        "Compiler estimates, not timings.", flush=True)


def main(argv: list[str] | None = None) -> None:
  try:
    args = parse_args(sys.argv[1:] if argv is None else argv)  # (--help | head: a broken pipe, below)
    if signal.getsignal(signal.SIGINT) is signal.SIG_DFL:  # __main__'s, while it imported: Ctrl-C is ours now
      signal.signal(signal.SIGINT, signal.default_int_handler)
    check_target(args.target)
    check_config(args)
    if _STATUS not in os.environ:  # the parent: compiles in a child a compiler crash cannot take down
      signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # so that it stops the child
      sys.exit(supervise(args))
    sys.exit(compile_and_print(args))
  except KeyboardInterrupt:
    sys.exit(130)
  except BrokenPipeError:  # the output's reader stopped (| head): stop quietly, as a shell's tools do
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # else the flush at exit fails again
    sys.exit(1)
  except Exception as e:
    message = emim_cli.explain(e)
    if message is None:
      raise
    emim_cli.fail(message, 1)
