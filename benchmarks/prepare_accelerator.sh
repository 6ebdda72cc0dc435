#!/usr/bin/env bash
# Run HERE (a machine with pip and ../shared), before borrowing an accelerator: gathers
# what benchmarks/accelerator.sh needs on a machine that has JAX, flax, optax, orbax and
# PyTorch but no internet and no ml-collections, grain or clu.
#   .whl/    wheels of the missing packages (Python 3.12, x86-64)
#   .accel/  the CIFAR-10 archive and the PyTorch reference scripts of ../shared/bench
# Both folders are ignored by git; name them in the device call's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl .accel
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl \
  ml-collections==1.1.0 grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 clu==0.0.12 wrapt
cp ../shared/data/cifar10-jpeg.tar.gz ../shared/bench/torch_reference.py ../shared/bench/torch_cifar_ssl.py .accel/
du -sh .whl .accel
