"""The default decode against the fast mode's earlier defaults and the official decode, prompt by prompt as
`illada-mlx generate` runs them (batch 1, the bundled model unless --model), in the same run.

    python bench/default_speed.py [--model DIR] [--reps 3] [--json bench/results/default_speed.json]

Settings: `default` (the model's own defaults: what a user gets), `fast_before` (threshold 0.9, token
cache, window refresh, no EOS fill: the fast mode's defaults before the drift refresh and the model's own
rule) and `variable` (the official iLLaDA decode). Each prompt runs each setting `reps` times, the settings
interleaved so that a busy machine slows them alike; the table keeps each one's median tokens/s.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from illada_mlx.decode import decode, run
from illada_mlx.engine import build_prompt
from illada_mlx.load import load
from illada_mlx.spec import make_spec

PROMPTS = ("reverse hello", "sort 3 1 2", "57+68=", "count 137 to 200", "count 712 to 800 by 4")
SETTINGS = {
    "default": dict(mode=None),
    "fast_before": dict(mode="fast", rule="threshold", threshold=0.9, block_refresh="window", eos_fill=False),
    "variable": dict(mode="variable"),
}


def one(model, tok, ids: list[int], setting: str) -> dict:
    spec = make_spec(model, tok, len(ids), max_tokens=256, **SETTINGS[setting])
    t0 = time.perf_counter()
    g = run(decode(model, [ids], spec))
    wall = time.perf_counter() - t0
    return {"text": tok.decode(g.tokens[0]), "tokens": g.stats.output_tokens, "forwards": g.stats.nfe,
            "processed": g.stats.processed, "tokens_per_s": g.stats.output_tokens / wall,
            "drift_refreshes": g.stats.drift_refreshes}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default="bench/results/default_speed.json")
    a = ap.parse_args()
    model, tok = load(a.model)
    rows = []
    for prompt in PROMPTS:
        ids = build_prompt(tok, [{"role": "user", "content": prompt}])
        runs = {name: [] for name in SETTINGS}
        one(model, tok, ids, "default")  # warm-up
        for _ in range(a.reps):
            for name in SETTINGS:
                runs[name].append(one(model, tok, ids, name))
        for name, rs in runs.items():
            r = {**rs[0], "tokens_per_s": statistics.median(x["tokens_per_s"] for x in rs)}
            rows.append({"prompt": prompt, "setting": name, **r})
            print(f"{prompt:24s} {name:12s} {r['tokens']:4d} tokens {r['forwards']:4d} forwards "
                  f"{r['tokens_per_s']:8.1f} tok/s  {r['text'][:40]!r}", flush=True)
    out = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
           "machine": platform.platform(), "rows": rows}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
