#!/usr/bin/env bash
# The first run of the demo model's chain (training/README.md), on a GPU: six configurations side by side on
# the one GPU (each run is launch-bound, so they share it well), every one for the same wall time; results
# as one tar per run in $OUT (checkpoint + tokenizer + train_log.json + stdout). The bundled model's chain
# starts from the run lr1e-3. Run from the repository root, with the train extra installed:
#   MINUTES=6 bash training/gpu_train.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
MINUTES=${MINUTES:-6.5}
mkdir -p "$OUT" /tmp/train
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
common=(--tokenizer illada_mlx/demo_model/tokenizer.json --batch 128 --steps 200000 --minutes "$MINUTES"
        --eval-every 2500 --workers 2 --seed 0 ${EXTRA:-})
declare -A runs
runs=(
  [lr3e-3]="--lr 3e-3"
  [lr2e-3]="--lr 2e-3"
  [lr1e-3]="--lr 1e-3"
  [lr2e-3_invt]="--lr 2e-3 --inv-t"
  [lr2e-3_ans0.5]="--lr 2e-3 --answer-only 0.5"
  [lr2e-3_b256]="--lr 2e-3 --batch 256"
)
for name in "${!runs[@]}"; do
  # shellcheck disable=SC2086
  python3 -m training.train_demo --out "/tmp/train/$name" "${common[@]}" ${runs[$name]} > "/tmp/train/$name.log" 2>&1 &
done
wait
for name in "${!runs[@]}"; do
  cp "/tmp/train/$name.log" "/tmp/train/$name/stdout.log"
  tail -1 "/tmp/train/$name.log"
  tar -C /tmp/train -czf "$OUT/$name.tgz" "$name"
done
