#!/usr/bin/env bash
# A Cloud TPU VM slice: this checkout copied to every host, installed with the gcs extra
# and the TPU wheels, then the same command on every host, one JAX process per host.
#   launch/tpu_vm.sh TPU_NAME ZONE configs/imagenet1k.py gs://BUCKET/runs/in1k [overrides...]
# The work directory must be one that every host reaches: a gs:// path (the hosts'
# service account needs write access to the bucket). The ImageNet TFDS data must be
# prepared as ArrayRecord where --config.data.tfds_data_dir points (gs:// works too).
set -euo pipefail
tpu=${1:?TPU name}; zone=${2:?zone}; config=${3:?config}; workdir=${4:?workdir}
shift 4
case "$workdir" in
  gs://*) ;;
  *) echo "The work directory must be a gs:// path every host can reach, not $workdir." >&2; exit 2 ;;
esac
repo=$(cd "$(dirname "$0")/.." && pwd)
overrides=$(printf ' %q' "$@")
bundle=$(mktemp -d)/emim.tar.gz
tar -C "$repo" --exclude=.git --exclude='*.npz' --exclude=runs --exclude=.emim_cache -czf "$bundle" .
gcloud compute tpus tpu-vm scp "$bundle" "$tpu":emim.tar.gz --zone="$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  rm -rf ~/emim && mkdir ~/emim && tar -C ~/emim -xzf ~/emim.tar.gz && cd ~/emim &&
  pip install -q '.[gcs]' 'jax[tpu]' &&
  python -m emim.main --distributed --config=$config --workdir=$workdir$overrides"
