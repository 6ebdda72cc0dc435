"""Moved to the package: ``python -m emim.aot`` (emim/aot/, docs/aot.md), which also
compiles for GPU hosts and takes every ``--config.field=value`` override emim.main takes.
This alias runs it with the same arguments (``--topology`` is ``--target``'s old name,
``--programs train model`` is now ``--programs=train,model``):

    python benchmarks/tpu_compile.py --config=configs/cifar10.py --topology=v5e:2x4
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without emim installed

import emim.aot  # noqa: E402

emim.aot.on_this_cpu()  # before JAX is imported (by cli)

from emim.aot import cli  # noqa: E402

if __name__ == "__main__":
  cli.main()
