#!/usr/bin/env bash
# Phase 2 of the demo model on the lent GPU machine: the phase-1 sweep (bench/gpu_train.sh) learned
# addition, sorting and reversal but not key -> value recall (an induction-style lookup; it stayed at
# "some value from the prompt"). Here recall asks one to three keys (more supervised lookups per
# example) and makes up half the mix; three runs start from the best phase-1 checkpoints, carried in
# .device/init/. $OUT/<run>/ gets model.safetensors + train_log.json (the stdout log is the same rows).
#   MINUTES=2.3 bash bench/gpu_finetune.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
MINUTES=${MINUTES:-2.3}
mkdir -p "$OUT" /tmp/train
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
common=(--tokenizer illada_mlx/demo_model/tokenizer.json --steps 200000 --minutes "$MINUTES" --eval-every 2000
        --workers 4 --seed 1 --tasks add,sort,reverse,recall,recall,recall ${EXTRA:-})
declare -A runs=(
  [p2_a]="--init .device/init/lr1e-3 --lr 1e-3 --batch 128"
  [p2_b]="--init .device/init/b256 --lr 2e-3 --batch 256"
  [p2_c]="--init .device/init/lr1e-3 --lr 1e-3 --batch 128 --answer-only 0.5"
)
for name in "${!runs[@]}"; do
  # shellcheck disable=SC2086
  python3 bench/train_demo.py --out "/tmp/train/$name" "${common[@]}" ${runs[$name]} > "/tmp/train/$name.log" 2>&1 &
done
wait
for name in "${!runs[@]}"; do
  mkdir -p "$OUT/$name"
  cp "/tmp/train/$name/model.safetensors" "/tmp/train/$name/train_log.json" "$OUT/$name/"
  tail -1 "/tmp/train/$name.log"
done
