#!/usr/bin/env bash
# A Cloud TPU VM slice: the same command on every host, one JAX process per host.
#   launch/tpu_vm.sh TPU_NAME ZONE configs/imagenet1k.py gs://BUCKET/runs/in1k [overrides...]
# The work directory must be shared by the hosts (a GCS path); the ImageNet TFDS data
# must be prepared (ArrayRecord) where --config.data.tfds_data_dir points.
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; config=${3:?config}; workdir=${4:?workdir}
shift 4
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  cd ~/emim && pip install -q -e . 'jax[tpu]' &&
  python -m emim.main --distributed --config=$config --workdir=$workdir $*"
