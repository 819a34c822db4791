#!/usr/bin/env bash
# What converting the demo model costs, measured with `illada-mlx eval`: the multiple-choice task
# (training/tasks/demo_mc50.yaml) on float32 / 8-bit / 4-bit conversions, then --compare float vs each.
# Usage: bash bench/eval_demo.sh [MC_NUM [N_PROMPTS]]     (default 16, 25; results in bench/results/eval_*.json)
set -euo pipefail
cd "$(dirname "$0")/.."
MC=${1:-16}
LIMIT=${2:-25}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
python - "$T" <<'PY'
import sys
from illada_mlx.demo import BUNDLED
from illada_mlx_convert import convert
d = sys.argv[1]
convert(str(BUNDLED), f"{d}/float32", progress=False)
convert(str(BUNDLED), f"{d}/8bit", quantize=True, q_bits=8, q_group_size=32, progress=False)
convert(str(BUNDLED), f"{d}/4bit", quantize=True, q_bits=4, q_group_size=32, progress=False)
convert(str(BUNDLED), f"{d}/mixed_4_8", quantize=True, q_recipe="mixed_4_8", progress=False)
PY
python -c "
import json
rows = [json.loads(l) for l in open('training/tasks/demo_mc50.jsonl')][:$LIMIT]
open('$T/answers.jsonl', 'w').write(''.join(json.dumps({'prompt': r['prompt'], 'answer': r['choices'][r['gold']]}) + '\n' for r in rows))"
export HF_DATASETS_OFFLINE=1
for w in float32 8bit 4bit mixed_4_8; do
  illada-mlx eval --model "$T/$w" --tasks illada_demo_mc50 --include-path training/tasks --apply-chat-template --limit "$LIMIT" \
    --mc-num "$MC" --batch-size "$MC" --no-greedy-check --json "bench/results/eval_mc50_$w.json"
done
[ "${TASKS_ONLY:-}" ] && exit 0  # the multiple-choice rows only
for w in 8bit 4bit mixed_4_8; do
  illada-mlx eval --compare "$T/float32" "$T/$w" --data "$T/answers.jsonl" --mc-num "$MC" --batch-size "$MC" \
    --json "bench/results/eval_compare_float32_vs_$w.json"
done
