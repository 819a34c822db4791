"""The default decode against the fast mode's earlier defaults and the official decode, prompt by prompt as
`illada-mlx generate` runs them (batch 1, the bundled model unless --model), in the same run.

    python bench/default_speed.py [--model DIR] [--reps 3] [--json bench/results/default_speed.json]
    python bench/default_speed.py --shape small --gen 1024 --reps 1 --json bench/results/default_speed_small.json

With --shape, a random-weight model of bench's shape (it never writes EOS, so every setting writes the whole
`--gen` tokens after a 64-token prompt) instead of the prompts, and "× ideal": processed tokens over
forwards × block length (every forward running one block and nothing else).

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
    "fast_before": dict(
        mode="fast", rule="threshold", threshold=0.9, cache="token", block_refresh="window", eos_fill=False
    ),
    "variable": dict(mode="variable"),
}


def one(model, tok, ids: list[int], setting: str) -> dict:
    spec = make_spec(model, tok, len(ids), max_tokens=256, **SETTINGS[setting])
    t0 = time.perf_counter()
    g = run(decode(model, [ids], spec))
    wall = time.perf_counter() - t0
    return {
        "text": tok.decode(g.tokens[0]),
        "tokens": g.stats.output_tokens,
        "forwards": g.stats.nfe,
        "processed": g.stats.processed,
        "tokens_per_s": g.stats.output_tokens / wall,
        "drift_refreshes": g.stats.drift_refreshes,
    }


def shape_rows(shape: str, gen: int, reps: int) -> list[dict]:
    import numpy as np

    from illada_mlx.bench import random_model

    model = random_model(shape)
    ids = np.random.default_rng(0).integers(10, model.args.vocab_size, 64).tolist()
    rows = []
    for name in ("fast_before", "default"):
        runs = []
        for _ in range(reps):
            spec = make_spec(model, None, len(ids), max_tokens=gen, logits_eos_inf=True, **SETTINGS[name])
            t0 = time.perf_counter()
            g = run(decode(model, [ids], spec))
            runs.append((g.stats, time.perf_counter() - t0))
        st = runs[0][0]
        r = {
            "shape": shape,
            "gen": gen,
            "setting": name,
            "tokens": st.output_tokens,
            "forwards": st.nfe,
            "processed": st.processed,
            "vs_ideal": st.processed / (st.nfe * spec.block_length),
            "drift_refreshes": st.drift_refreshes,
            "cache": spec.cache,
            "block_refresh": spec.block_refresh,
            "tokens_per_s": statistics.median(st.output_tokens / w for st, w in runs),
        }
        rows.append(r)
        print(
            f"{shape} gen {gen} {name:12s} {r['forwards']} forwards, processed {r['vs_ideal']:.2f}x ideal, "
            f"{r['drift_refreshes']} whole-canvas refreshes, {r['tokens_per_s']:.2f} tok/s",
            flush=True,
        )
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shape", default=None, help="a random model of this bench shape (small, ...) instead")
    ap.add_argument("--gen", type=int, default=1024, help="with --shape: tokens to write")
    ap.add_argument("--json", default="bench/results/default_speed.json")
    a = ap.parse_args()
    if a.shape:
        rows = shape_rows(a.shape, a.gen, a.reps)
    else:
        rows = prompt_rows(a.model, a.reps)
    out = {
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.platform(),
        "rows": rows,
    }
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))


def prompt_rows(path, reps: int) -> list[dict]:
    model, tok = load(path)
    rows = []
    for prompt in PROMPTS:
        ids = build_prompt(tok, [{"role": "user", "content": prompt}])
        runs = {name: [] for name in SETTINGS}
        one(model, tok, ids, "default")  # warm-up
        for _ in range(reps):
            for name in SETTINGS:
                runs[name].append(one(model, tok, ids, name))
        for name, rs in runs.items():
            r = {**rs[0], "tokens_per_s": statistics.median(x["tokens_per_s"] for x in rs)}
            rows.append({"prompt": prompt, "setting": name, **r})
            print(
                f"{prompt:24s} {name:12s} {r['tokens']:4d} tokens {r['forwards']:4d} forwards "
                f"{r['tokens_per_s']:8.1f} tok/s  {r['text'][:40]!r}",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main()
