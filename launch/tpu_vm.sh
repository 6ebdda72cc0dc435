#!/usr/bin/env bash
# A Cloud TPU VM slice that exists already (this script creates none): this checkout
# copied to every host, installed with the gcs and tpu extras, then the same command on
# every host, one JAX process per host.
#   launch/tpu_vm.sh [--dry_run] [--libtpu=VERSION] TPU_NAME ZONE configs/imagenet1k.py gs://BUCKET/runs/in1k [overrides...]
# --dry_run prints the commands (gcloud's included) instead of running them.
# --libtpu=VERSION installs that libtpu over the one jax's tpu extra pins: --libtpu=0.0.52
# on a v6e, where the pinned 0.0.42.1 crashes compiling the ResNet steps (emim/tpu.py).
# The work directory must be one that every host reaches: a gs:// path (the hosts'
# service account needs write access to the bucket). The ImageNet TFDS data must be
# prepared as ArrayRecord where --config.data.tfds_data_dir points (gs:// works too).
# Which slice a config needs, and its launch command: the README's "Cloud TPU" section.
set -euo pipefail
dry_run=0
libtpu=""
usage="usage: launch/tpu_vm.sh [--dry_run] [--libtpu=VERSION] TPU_NAME ZONE CONFIG gs://BUCKET/WORKDIR [--config.FIELD=VALUE ...]"
while [[ "${1:-}" == --dry_run || "${1:-}" == --libtpu || "${1:-}" == --libtpu=* ]]; do
  case "$1" in
    --dry_run) dry_run=1 ;;
    --libtpu) libtpu=${2:-}; shift $(($# > 1)) ;;
    --libtpu=*) libtpu=${1#--libtpu=} ;;
  esac
  [[ "$1" == --libtpu* ]] && libtpu=${libtpu:-none}  # given, with no version: refused below
  shift
done
if [[ -n "$libtpu" && ! "$libtpu" =~ ^[0-9][0-9.]*$ ]]; then
  echo "--libtpu wants a version, e.g. --libtpu=0.0.52, not '$libtpu'." >&2; exit 2
fi
if (($# < 4)); then echo "$usage" >&2; exit 2; fi
for arg in "${@:5}"; do  # the script's own options, given after the config, would reach emim.main
  case "$arg" in
    --dry_run|--libtpu|--libtpu=*) echo "$arg is launch/tpu_vm.sh's option: put it before TPU_NAME. $usage" >&2; exit 2 ;;
  esac
done
tpu=$1; zone=$2; config=$3; workdir=$4
shift 4
case "$workdir" in
  gs://*) ;;
  *) echo "The work directory must be a gs:// path every host can reach, not $workdir." >&2; exit 2 ;;
esac
repo=$(cd "$(dirname "$0")/.." && pwd)
if [[ ! -f "$repo/${config%%:*}" ]]; then
  echo "No config ${config%%:*} in $repo (the configs are configs/*.py)." >&2; exit 2
fi
overrides=""  # printf with no arguments would still print one empty argument ('')
if (($#)); then overrides=$(printf ' %q' "$@"); fi
if ((dry_run)); then bundle=/tmp/emim-bundle/emim.tar.gz; else bundle=$(mktemp -d)/emim.tar.gz; fi

run() {  # a command, or with --dry_run its line (arguments with spaces or quotes in single quotes)
  if ((dry_run)); then
    local out=() arg
    for arg in "$@"; do
      if [[ "$arg" =~ ^[A-Za-z0-9_./:=@%+,~-]+$ ]]; then out+=("$arg"); else out+=("'${arg//\'/\'\\\'\'}'"); fi
    done
    echo "${out[*]}"
  else
    "$@"
  fi
}

install="pip install -q '.[gcs,tpu]'${libtpu:+ && pip install -q libtpu==$libtpu}"
remote="rm -rf ~/emim && mkdir ~/emim && tar -C ~/emim -xzf ~/emim.tar.gz && cd ~/emim && \
$install && python -m emim.main --distributed --config=$config --workdir=$workdir$overrides"
run tar -C "$repo" --exclude=.git --exclude='*.npz' --exclude=runs --exclude=.emim_cache -czf "$bundle" .
run gcloud compute tpus tpu-vm scp "$bundle" "$tpu":emim.tar.gz --zone="$zone" --worker=all
run gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="$remote"
