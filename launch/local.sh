#!/usr/bin/env bash
# One machine, every local accelerator (or the CPU).
#   launch/local.sh configs/cifar10.py runs/cifar10 [--config.train.batch_size=512 ...]
# For GPUs install the CUDA wheels first: pip install -U "jax[cuda12]"
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [overrides...]}
shift 2
# Let XLA take most of the GPU memory up front instead of growing it step by step.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
python -m emim.main --config="$config" --workdir="$workdir" "$@"
python -m emim.evaluate --workdir="$workdir"
