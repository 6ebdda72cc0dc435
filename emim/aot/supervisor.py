"""The compiles run in a child process: where the compiler itself crashes (a signal, not
an error it reports: libtpu 0.0.42.1 on the v6e ResNet steps), the program's row says
so, and the programs after it are compiled in a fresh child."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

# Set in the child process that compiles: a file it names the program it is compiling in.
_STATUS = "EMIM_TPU_COMPILE_STATUS"


def note_compiling(program: str | None, images: int = 0, devices: int = 1, compiler: str = "", **extra) -> None:
  """In the compiling child, the program it is about to compile (None: between compiles)
  and the compiler (e.g. "libtpu 0.0.42.1"), for the parent to name if the compiler
  crashes; written whole or not at all."""
  path = os.environ.get(_STATUS)
  if path:
    with open(path + ".tmp", "w") as f:
      json.dump({"program": program, "images": images, "devices": devices, "compiler": compiler,
                 "since": time.time(), **extra}, f)
    os.replace(path + ".tmp", path)


def _read_status(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):  # none written yet
    return {}


def config_args(argv: list[str]) -> list[str]:
  """The --config and --config.field=value arguments of a command line, as given."""
  out, take_next = [], False
  for arg in argv:
    if take_next or arg == "--config" or arg.startswith(("--config=", "--config.")):
      out.append(arg)
      take_next = not take_next and "=" not in arg  # "--config.x value": the value is the next argument
    else:
      take_next = False
  return out


def _child_argv(args, programs: list[str], first: bool, max_batch: bool) -> list[str]:
  flagfiles = [a for a in args.argv if a.startswith("--flagfile=")]  # the flags after them win
  argv = [sys.executable, "-m", "emim.aot", *flagfiles, *config_args(args.argv), f"--target={args.target}",
          f"--programs={','.join(programs)}"]
  argv += [f"--batch={args.batch}"] if args.batch else []
  # Said either way where a flagfile may say otherwise: after a crash, no second breakdown, and no search that would
  # compile the step that died again.
  argv += ["--max_batch"] if max_batch else ["--nomax_batch"] if flagfiles else []
  argv += ["--breakdown"] if args.breakdown and first else ["--nobreakdown"] if flagfiles else []
  argv += [] if first else ["--no_header"]
  return argv


# The signals a crash of native code dies of; any other came from outside the process.
_CRASHES = {signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGILL, signal.SIGFPE}


def crash_line(status: dict, returncode: int, table: bool) -> str:
  """A child that died of a signal, in one line: a table row (``table``) or a line of
  ``--max_batch``'s when it died compiling a program, else a sentence."""
  try:
    name = signal.Signals(-returncode).name
  except ValueError:
    name = f"signal {-returncode}"
  program = status.get("program")
  compiler = status.get("compiler") or "the compiler"
  if -returncode == signal.SIGKILL:  # no compiler's crash sends it: most often the kernel's out-of-memory killer
    what = ("killed (SIGKILL: most often this machine's out-of-memory killer; a ResNet-50 step takes up to 10 GiB "
            "of it to compile)")
  elif -returncode not in _CRASHES:  # sent from outside (SIGTERM, SIGHUP): not the compiler's doing
    what = f"stopped by {name}, sent from outside"
  elif not status:
    return f"The compiling process died of {name} before its first compile."
  elif program is None:
    return f"{compiler} crashed ({name}) after the last compile; the rows above stand."
  elif compiler.startswith("libtpu"):
    what = (f"{compiler} crashed compiling it ({name}, {time.time() - status['since']:.0f} s in): "
            "a crash inside XLA's TPU compiler, not an error it reports; another libtpu may compile it "
            "(TPU_LIBRARY_PATH=.../libtpu.so)")
  else:
    what = (f"{compiler} crashed compiling it ({name}, {time.time() - status['since']:.0f} s in): "
            "a crash inside the compiler, not an error it reports")
  if program is None:
    return f"The compiling process was {what}."
  images, devices = status.get("images", 0), status.get("devices", 1)
  if status.get("max_batch"):
    return f"  batch {images}: failed: {what}"
  return f"| {program} | {images} ({images // devices}) | failed: {what} |" if table else f"{program}: failed: {what}"


def supervise(args, child_argv=_child_argv) -> int:
  """Runs the compiles in a child process, its output passed on; where the child dies of
  a signal (the compiler crashed), reports the program it was compiling and goes on with the
  programs after it in a fresh child (``--max_batch`` after them, unless the train step
  is what crashed). The exit status: the child's; 1 after a crash; 130 on an interrupt.
  The child never outlives it."""
  programs, first, crashed, max_batch = list(args.programs), True, False, args.max_batch
  while True:
    with tempfile.TemporaryDirectory(prefix="emim-aot-") as tmp:
      status_path = os.path.join(tmp, "compiling.json")
      child = subprocess.Popen(child_argv(args, programs, first, max_batch), stdout=subprocess.PIPE, text=True,
                               env={**os.environ, _STATUS: status_path})
      table = False
      try:
        for line in child.stdout:
          table = table or line.startswith("| program |")
          print(line, end="", flush=True)
        returncode = child.wait()
      finally:  # an interrupt, or SIGTERM (main()): a compile left running holds minutes of CPU and GiBs
        if child.poll() is None:
          child.kill()
          child.wait()
      status = _read_status(status_path)
    if returncode == -signal.SIGINT:
      return 130
    if returncode >= 0:
      return 1 if crashed else returncode
    crashed = True
    print(crash_line(status, returncode, table or not first), flush=True)
    program = status.get("program")
    if status.get("max_batch"):  # in the search, after the table: nothing is left to compile
      return 1
    if program == "train" and max_batch:  # its search would compile the step that died, again
      print("--max_batch: not searched, the train step's compile died.", flush=True)
      max_batch = False
    if program not in programs:  # before the first compile or after the last
      return 1
    programs, first = programs[programs.index(program) + 1:], False
    if not programs and not max_batch:
      return 1
