#!/usr/bin/env bash
# Train the demo model on the lent GPU machine: six configurations side by side on the one GPU (each
# run is launch-bound, so they share it well), every one for the same wall time; results as one
# tar per run in $OUT (checkpoint + tokenizer + train_log.json + stdout). The best by held-out probe
# accuracy becomes illada_mlx/demo_model (bench/README.md records which and why).
#   MINUTES=6.5 bash bench/gpu_train.sh              the sweep that gave the bundled model's phase 1 (run lr1e-3)
#   SET=next MINUTES=6.5 bash bench/gpu_train.sh     the runs planned for the next lent GPU: the harder
#     order-sensitive "sums" task from the bundled model (CPU runs never got past its last two digits), and
#     from scratch whether the diffusion loss alone, given GPU-many rows, learns recall (the bundled model
#     needed recall as classification first: bench/README.md phase 9); watch sums, recall, recall_abcd and
#     "order_probe" in each run's log
set -uo pipefail
OUT=${OUT:-/tmp/out}
MINUTES=${MINUTES:-6.5}
mkdir -p "$OUT" /tmp/train
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
common=(--tokenizer illada_mlx/demo_model/tokenizer.json --batch 128 --steps 200000 --minutes "$MINUTES"
        --eval-every 2500 --workers 2 --seed 0 ${EXTRA:-})
declare -A runs
if [ "${SET:-bundle}" = next ]; then
  all6=add,sort,reverse,recall,parity,sums
  common+=(--max-area 256)  # the bundled model decodes fixed canvases of up to 256; keep it so
  runs=(
    [sums_ft_lr5e-4]="--init illada_mlx/demo_model --lr 5e-4 --tasks add,sort,reverse,recall,parity,sums,sums"
    [sums_ft_lr1e-3]="--init illada_mlx/demo_model --lr 1e-3 --tasks add,sort,reverse,recall,parity,sums,sums"
    [abcd_scratch]="--tasks $all6,recall_abcd,recall_abcd"
    [abcd_heavy_scratch]="--tasks add,sort,reverse,parity,sums,recall,recall_abcd,recall_abcd,recall_abcd,recall_abcd"
    [all6]="--tasks $all6"
    [all6_ans0.5]="--tasks $all6 --answer-only 0.5"
  )
else runs=(
  [lr3e-3]="--lr 3e-3"
  [lr2e-3]="--lr 2e-3"
  [lr1e-3]="--lr 1e-3"
  [lr2e-3_invt]="--lr 2e-3 --inv-t"
  [lr2e-3_ans0.5]="--lr 2e-3 --answer-only 0.5"
  [lr2e-3_b256]="--lr 2e-3 --batch 256"
); fi
for name in "${!runs[@]}"; do
  # shellcheck disable=SC2086
  python3 bench/train_demo.py --out "/tmp/train/$name" "${common[@]}" ${runs[$name]} > "/tmp/train/$name.log" 2>&1 &
done
wait
for name in "${!runs[@]}"; do
  cp "/tmp/train/$name.log" "/tmp/train/$name/stdout.log"
  tail -1 "/tmp/train/$name.log"
  tar -C /tmp/train -czf "$OUT/$name.tgz" "$name"
done
