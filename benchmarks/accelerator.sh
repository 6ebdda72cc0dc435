#!/usr/bin/env bash
# The accelerator figures of BENCHMARKS.md, in a few full commands on a borrowed GPU
# (after benchmarks/prepare_accelerator.sh here). Each stage fits in one 10-minute call
# and writes its logs to $OUT. A 15-minute lease: evidence first, evidence2 at once if
# 4 minutes are left (BENCHMARKS.md, "How to re-run"):
#   bash benchmarks/accelerator.sh evidence  # 9 minutes, 7 files: the CIFAR-10 step's breakdown at
#                                          # batch 256/512, then EMMI, Barlow Twins and BYOL side by
#                                          # side for as many equal epochs as fit, kNN and linear probe,
#                                          # beside the untrained network (benchmarks/evidence.py)
#   bash benchmarks/accelerator.sh evidence2 # about 6 minutes (BUDGET_S=360): the ResNet-50 step at 224,
#                                          # EMMI and BYOL beside torch.compile's, then CIFAR-100 EMMI
#                                          # and Barlow Twins at equal epochs if its data is in .accel/
#   bash benchmarks/accelerator.sh bench   # objective cost; train step vs torch_reference.py
#   bash benchmarks/accelerator.sh cifar   # a short configs/cifar10.py run, then emim.evaluate
#                                          # (and torch_cifar_ssl.py for the same epochs, when
#                                          # TORCH_EPOCHS > 0; RUN_ARGS adds config overrides)
#   bash benchmarks/accelerator.sh resume  # bit-exact restart on the GPU, default and
#                                          # deterministic XLA kernels, and their cost
#   bash benchmarks/accelerator.sh sweep --epochs=20 --variant='byol=:byol' ...
#                                          # CIFAR-10 variants side by side (cifar_sweep.py)
#   bash benchmarks/accelerator.sh breakdown  # the step's time part by part (step_breakdown.py),
#                                          # EMMI and Barlow Twins, batch 256 and 512
#   bash benchmarks/accelerator.sh resnet50  # ResNet-50 at 224, bf16: emim's EMMI and BYOL steps at
#                                          # batch 128 and 256 beside torch_reference.py --arch resnet50
#                                          # (torch.compile), and the host pipeline with 16 workers
#   bash benchmarks/accelerator.sh long NAME [--config.x=... overrides]
#                                          # one long run across several calls on a machine kept
#                                          # warm: each call trains until TRAIN_LIMIT (SIGTERM: a
#                                          # checkpoint at the step reached), the next resumes;
#                                          # kNN on all test images every KNN_EVERY steps; once
#                                          # finished, the linear probe (PROBE_EPOCHS, augmented)
# CPU smoke test of the script itself: SMOKE=1 bash benchmarks/accelerator.sh cifar
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: accelerator.sh evidence|evidence2|bench|cifar|resume|sweep|breakdown|resnet50|long}
OUT=${OUT:-/tmp/emim_accelerator}
mkdir -p "$OUT"
if ! python3 -c "import grain, ml_collections, clu" 2> /dev/null; then  # the carried wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
CIFAR=${CIFAR:-$PWD/.accel/cifar10-jpeg.tar.gz}
WORKDIR=${WORKDIR:-/tmp/emim_cifar10}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  python3 -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__)"
} 2>&1 | tee "$OUT/env.txt"

smoke=(); [ "${SMOKE:-0}" = 1 ] && smoke=(--smoke)
case "$stage" in
  evidence)
    # Its own limits inside (BUDGET_S, default 510 s): whatever happens, it writes what it has.
    python3 benchmarks/evidence.py --data="$CIFAR" --out="$OUT" --budget_s="${BUDGET_S:-510}" "${smoke[@]}" 2>&1 \
      | grep -v "^W" | tee "$OUT/evidence.log"
    ;;
  evidence2)
    # What a lease has left after `evidence` (on 2026-12-04: 456 s of device time, with a
    # warm machine), inside BUDGET_S. First the ResNet-50 step at 224: emim's own EMMI and
    # BYOL steps at batch 256 (the `emim` rows alone: with the `model` row first, the
    # 90-second limit of 2026-12-04 ended each process before its emim row), beside
    # torch.compile's BYOL step (its eager step was measured then: 159.67 ms); then, if
    # CIFAR-100 is here (an image folder or archive in .accel/cifar100*: no machine here
    # can download it) and 150 s are left, EMMI and Barlow Twins at equal epochs at the
    # rate `evidence` measured (no second breakdown).
    SECONDS=0
    budget=${BUDGET_S:-360}
    step=(--batch 256 --steps 20 --rows emim); configs=(configs/imagenet1k.py configs/imagenet1k.py:byol)
    if [ "${SMOKE:-0}" = 1 ]; then
      step=(--batch 32 --steps 3 --rows emim); configs=(configs/imagenet1k.py:runlocal configs/imagenet1k.py:byol,runlocal)
    fi
    for config in "${configs[@]}"; do
      timeout "${STEP_LIMIT:-110}" python3 benchmarks/train_step.py --config="$config" "${step[@]}" 2>&1 | grep -v "^W" \
        | tee -a "$OUT/resnet50_train_step.txt"
    done
    if [ -f .accel/torch_reference.py ] && python3 -c "import torch; assert torch.cuda.is_available()" 2> /dev/null; then
      timeout "${TORCH_LIMIT:-130}" python3 .accel/torch_reference.py --arch resnet50 --image 224 --method byol \
        --batch 256 --compile yes --steps 20 --warmup 5 2>&1 | tee "$OUT/resnet50_torch_reference.txt"
    fi
    CIFAR100=${CIFAR100:-$(ls -d .accel/cifar100* 2> /dev/null | head -1)}
    left=$((budget - SECONDS))
    if [ -n "$CIFAR100" ] && [ "$left" -ge 150 ]; then
      python3 benchmarks/evidence.py --config=configs/cifar100.py --data="$CIFAR100" \
        --set=--config.data.source=image_folder --methods emmi barlow_twins --no_breakdown \
        --out="$OUT/cifar100" --budget_s="$left" --workroot=/tmp/emim_evidence100 2>&1 | grep -v "^W" \
        | tee "$OUT/evidence100.log"
    else
      echo "evidence2: CIFAR-100 skipped (data: '${CIFAR100:-none in .accel/cifar100*}'; ${left}s of ${budget}s left, 150 needed)." \
        | tee "$OUT/evidence100.log"
    fi
    ;;
  bench)
    objective=(--dims 512 2048 4096); step=(--config=configs/cifar10.py --batch 256 512)
    if [ "${SMOKE:-0}" = 1 ]; then
      objective=(--dims 128 --repeats 1); step=(--config=configs/synthetic.py:runlocal --batch 32 --steps 3)
    fi
    python3 benchmarks/objective_cost.py "${objective[@]}" 2>&1 | tee "$OUT/objective_cost.txt"
    python3 benchmarks/train_step.py "${step[@]}" 2>&1 | tee "$OUT/train_step.txt"
    if [ -f .accel/torch_reference.py ] && python3 -c "import torch; assert torch.cuda.is_available()" 2> /dev/null; then
      python3 .accel/torch_reference.py --batch 256 512 --compile both 2>&1 | tee "$OUT/torch_reference.txt"
    fi
    ;;
  cifar)
    EPOCHS=${EPOCHS:-20}
    PROBE_EPOCHS=${PROBE_EPOCHS:-20}
    TORCH_EPOCHS=${TORCH_EPOCHS:-0}
    run=(--config=configs/cifar10.py --config.data.path="$CIFAR")
    # RUN_ARGS: more overrides for both programs, e.g. RUN_ARGS=--config.model.dtype=bfloat16
    read -r -a extra <<< "${RUN_ARGS:-}"
    run+=("${extra[@]}")
    if [ "${SMOKE:-0}" = 1 ]; then  # the script's own CPU check: a tiny model, a few steps
      run+=(--config.model.backbone=resnet_tiny --config.model.width=8 "--config.model.projector_dims=(64,32)"
            --config.train.batch_size=32 --config.eval.knn_train_subset=256 --config.eval.knn_test_subset=128
            --config.eval.mi_batch_size=64 --config.eval.batch_size=256)
      train=(--config.train.num_steps=4 --config.train.log_every=2)
      probe=(--config.eval.probe_epochs=1 --config.eval.probe_mode=features)
    else
      train=(--config.train.num_epochs="$EPOCHS" --config.optim.warmup_epochs=2 --config.eval.every_steps=0)
      probe=(--config.eval.probe_epochs="$PROBE_EPOCHS")
    fi
    rm -rf "$WORKDIR"
    SECONDS=0
    # Past TRAIN_LIMIT the run is stopped and evaluation reads its last checkpoint, so the
    # call still ends inside the device's 10-minute limit with figures to show.
    timeout "${TRAIN_LIMIT:-330}" python3 -m emim.main "${run[@]}" "${train[@]}" --workdir="$WORKDIR" 2>&1 \
      | grep -v "^W" | tee "$OUT/train.log"
    echo "train wall clock: ${SECONDS}s" | tee -a "$OUT/train.log"
    cp "$WORKDIR/metrics.jsonl" "$OUT/"; cp "$WORKDIR/timings.json" "$OUT/" 2> /dev/null
    SECONDS=0
    # The model fields must match the checkpoint's: the same config and overrides.
    python3 -m emim.evaluate "${run[@]}" "${probe[@]}" --workdir="$WORKDIR" 2>&1 | grep -v "^W" | tee "$OUT/evaluate.log"
    echo "evaluate wall clock: ${SECONDS}s" | tee -a "$OUT/evaluate.log"
    cp "$WORKDIR/evaluation.json" "$OUT/"
    if [ "$TORCH_EPOCHS" -gt 0 ] && [ -f .accel/torch_cifar_ssl.py ]; then
      python3 .accel/torch_cifar_ssl.py --data "$CIFAR" --epochs "$TORCH_EPOCHS" --workers 16 --eval_every "$TORCH_EPOCHS" \
        2>&1 | tee "$OUT/torch_cifar_ssl.txt"
    fi
    ;;
  resume)
    # A restart in a fresh process equal to the bit? With XLA's default GPU kernels and
    # with its deterministic ones; then what the deterministic kernels cost per step.
    exact=(--config=configs/cifar10.py --steps 40 --stop 20 --set data.path="$CIFAR")
    [ "${SMOKE:-0}" = 1 ] && exact=(--config=configs/synthetic.py:runlocal --steps 4 --stop 2)
    python3 benchmarks/resume_exactness.py "${exact[@]}" 2>&1 | tee "$OUT/resume_default.txt"
    python3 benchmarks/resume_exactness.py "${exact[@]}" --deterministic 2>&1 | tee "$OUT/resume_deterministic.txt"
    step=(--config=configs/cifar10.py --batch 512)
    [ "${SMOKE:-0}" = 1 ] && step=(--config=configs/synthetic.py:runlocal --batch 32 --steps 3)
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true" python3 benchmarks/train_step.py "${step[@]}" 2>&1 \
      | tee "$OUT/train_step_deterministic.txt"
    ;;
  sweep)
    python3 benchmarks/cifar_sweep.py --data="$CIFAR" --out="$OUT/sweep" "${@:2}" 2>&1 | tee "$OUT/sweep.txt"
    # Each run's logs and metrics in one archive: a device call returns only a few files.
    (cd "$OUT/sweep" && tar czf ../sweep_runs.tgz -- */ && rm -rf -- */)
    ;;
  breakdown)
    configs=(configs/cifar10.py configs/cifar10.py:barlow_twins); sizes=(--batch 256 512)
    if [ "${SMOKE:-0}" = 1 ]; then
      configs=(configs/synthetic.py:runlocal configs/synthetic.py:barlow_twins,runlocal); sizes=(--batch 32 --steps 3)
    fi
    for config in "${configs[@]}"; do
      name=$(basename "${config%%:*}" .py)_$(echo "${config#*:}" | tr ',:/' '___')
      python3 benchmarks/step_breakdown.py --config="$config" "${sizes[@]}" --out="$OUT/breakdown_$name" 2>&1 \
        | grep -v "^W" | tee "$OUT/breakdown_$name.txt"
    done
    ;;
  resnet50)
    read -r -a batches <<< "${RESNET_BATCHES:-128 256}"
    sizes=(--batch "${batches[@]}"); pipe=(--generate=2048 --workers 16)
    configs=(configs/imagenet1k.py configs/imagenet1k.py:byol)
    if [ "${SMOKE:-0}" = 1 ]; then
      sizes=(--batch 32 --steps 3); pipe=(--generate=128 --workers 2 --repeats 1)
      configs=(configs/imagenet1k.py:runlocal configs/imagenet1k.py:byol,runlocal)
    fi
    for config in "${configs[@]}"; do
      python3 benchmarks/train_step.py --config="$config" "${sizes[@]}" 2>&1 | grep -v "^W" \
        | tee -a "$OUT/resnet50_train_step.txt"
    done
    if [ -f .accel/torch_reference.py ] && python3 -c "import torch; assert torch.cuda.is_available()" 2> /dev/null; then
      python3 .accel/torch_reference.py --arch resnet50 --image 224 --method byol --batch "${batches[@]}" --compile both \
        2>&1 | tee "$OUT/resnet50_torch_reference.txt"
    fi
    [ "${PIPELINE:-1}" = 0 ] && { ls -la "$OUT"; exit 0; }
    # the fastest emim step just timed sets the demand the pipeline is measured against
    demand=${STEP_PAIRS_PER_S:-$(awk '/^emim\[/ {for (i = 1; i < NF; i++) if ($(i + 1) ~ /^pairs\/s/) \
      if ($i + 0 > best) best = $i + 0} END {print best + 0}' "$OUT/resnet50_train_step.txt")}
    python3 benchmarks/input_pipeline.py "${pipe[@]}" --step_pairs_per_s="$demand" --out="$OUT/input_pipeline" 2>&1 | grep -v "^W" \
      | tee "$OUT/input_pipeline.txt"
    ;;
  long)
    name=${2:?usage: accelerator.sh long NAME [overrides]}
    run_dir=${LONG_DIR:-/tmp/emim_long}/$name
    run=(--config="${CONFIG:-configs/cifar10.py}" --config.data.path="$CIFAR" "${@:3}")
    # kNN on all 10,000 test images against all 50,000 training images, every KNN_EVERY
    # steps (1950: 10 CIFAR epochs at batch 256): the accuracy-over-time curve.
    knn=(--config.eval.every_steps="${KNN_EVERY:-1950}" --config.eval.knn_train_subset=50000
         --config.eval.knn_test_subset=10000)
    probe=(--config.eval.probe_epochs="${PROBE_EPOCHS:-100}" --config.eval.probe_mode=augmented)
    if [ "${SMOKE:-0}" = 1 ]; then
      run=(--config=configs/synthetic.py:runlocal --config.train.num_steps=6 "${@:3}")
      knn=(--config.eval.every_steps=3); probe=(--config.eval.probe_epochs=1 --config.eval.probe_mode=features)
    fi
    mkdir -p "$run_dir"
    SECONDS=0
    timeout --signal=TERM "${TRAIN_LIMIT:-540}" python3 -m emim.main "${run[@]}" "${knn[@]}" --workdir="$run_dir" 2>&1 \
      | grep -v "^W" | tee -a "$OUT/$name.train.log"
    rc=${PIPESTATUS[0]}
    echo "$SECONDS" >> "$run_dir/call_seconds.txt"
    echo "$name: this call ran ${SECONDS}s (exit $rc); calls so far: $(awk '{s += $1} END {print s}' "$run_dir/call_seconds.txt")s" \
      | tee -a "$OUT/$name.train.log"
    cp "$run_dir/metrics.jsonl" "$OUT/$name.metrics.jsonl"; cp "$run_dir/timings.json" "$OUT/$name.timings.json" 2> /dev/null
    if [ "$rc" = 0 ]; then  # finished: the standard linear probe on the last checkpoint
      SECONDS=0
      python3 -m emim.evaluate --workdir="$run_dir" "${probe[@]}" 2>&1 | grep -v "^W" | tee "$OUT/$name.evaluate.log"
      echo "$name: evaluation ${SECONDS}s" | tee -a "$OUT/$name.evaluate.log"
      cp "$run_dir/evaluation.json" "$OUT/$name.evaluation.json"
    else
      echo "$name: not finished; the same command resumes it from its checkpoint." | tee -a "$OUT/$name.train.log"
    fi
    ;;
  *) echo "unknown stage $stage: bench, cifar, resume, sweep, breakdown, resnet50 or long" >&2; exit 2 ;;
esac
ls -la "$OUT"
