#!/usr/bin/env bash
# The demo model's yardstick on every family, in two processes (one per core of a 2-core machine):
#   bash bench/quality_demo.sh [MODEL_DIR] [N] [N_TURNS] [N_LONG]
# float32: the five tasks (exact, random remasking, variable = the default mode, fast); the multi-turn
# turns 2-4 (variable; fast, also as a chat session carrying the cross-turn cache); the long answers
# (variable without a cache; fast without and with its default cache). 8-bit, 4-bit and the recommended
# recipe (mixed_4_8): fast mode on every family. Results: bench/results/quality_demo_{tasks,turns,long}.json.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-illada_mlx/demo_model}
N=${2:-30}
N_TURNS=${3:-20}
N_LONG=${4:-10}
PY=${PYTHON:-.venv/bin/python}
LOGS=$(mktemp -d)  # each job's progress lines, printed at the end
Q="--q-sampler fast_t0.9_token --recipe mixed_4_8"
run() {  # name, then quality.py's arguments
  local name=$1; shift
  $PY bench/quality.py --model "$MODEL" $Q "$@" --json "bench/results/quality_demo_$name.json" \
    > "$LOGS/quality_demo_$name.log" 2>&1
}
run tasks --n "$N" --tasks add,sort,reverse,recall,parity \
  --samplers exact,exact_random_remask,variable,fast_t0.9_token &
first=$!
(run turns --n "$N_TURNS" --tasks turn2,turn3,turn4 --samplers variable,fast_t0.9_token --chat &&
 run long --n "$N_LONG" --tasks count,countround,countby,countbyround --samplers variable,fast_t0.9_nocache,fast_t0.9_token) &
second=$!
rc=0
wait $first || rc=$?
wait $second || rc=$?
cat "$LOGS"/quality_demo_{tasks,turns,long}.log
exit $rc
