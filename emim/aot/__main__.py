"""python -m emim.aot: see emim/aot/cli.py."""

import signal

# Until main() takes Ctrl-C, it ends the process as the default action does: raised as KeyboardInterrupt while JAX
# is imported, it can land in a garbage collector's callback, where Python prints it and goes on to compile.
if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # (an ignored SIGINT stays ignored)
  signal.signal(signal.SIGINT, signal.SIG_DFL)

import emim.aot  # noqa: E402

emim.aot.on_this_cpu()  # before JAX is imported (by cli)

from emim.aot import cli  # noqa: E402

if __name__ == "__main__":
  cli.main()
