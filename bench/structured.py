"""Structured output: JSON valid against its schema by construction, on generated schemas, in every
decoding mode, on the bundled model and on random weights of its shape.

    python bench/structured.py [--n 200] [--modes exact,variable,fast,fast_fixed] [--weights demo,random]
        [--json bench/results/structured.json]

Each schema (objects nested to depth 3, strings, integers, numbers, booleans, enums, bounded arrays,
required and optional keys; tests/test_structured.py's generator) is answered for one of the demo's
prompts; the row counts the answers that parse and validate (jsonschema), the forwards and the processed
tokens per answer. The random-weight model has the demo's vocabulary and a smaller body (hidden 64, 2
layers): validity is the template's rules', whatever the weights, and its confidences never reach a
threshold, so every mode runs one forward per open position.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import jsonschema
import mlx.core as mx

from illada_mlx.engine import build_prompt
from illada_mlx.load import load
from illada_mlx.model import Model
from illada_mlx.structured import generate_json
from training.schemas import random_schema

PROMPTS = ("reverse hello", "57+68=", "sort 3 1 2", "count 5 to 9")


def row(model, tok, weights: str, mode: str, n: int) -> dict:
    rng = random.Random(0)
    valid = nfe = processed = 0
    t0 = time.perf_counter()
    for i in range(n):
        schema = random_schema(rng)
        ids = build_prompt(tok, [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}])
        r = generate_json(model, tok, ids, schema, mode=mode, seed=i)
        try:
            jsonschema.validate(json.loads(r.text), schema)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
        nfe += r.stats.nfe
        processed += r.stats.processed
    out = {
        "weights": weights,
        "mode": mode,
        "schemas": n,
        "valid": valid,
        "forwards_per_answer": nfe / n,
        "processed_per_answer": processed / n,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(out, flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--modes", default="exact,variable,fast,fast_fixed")
    ap.add_argument("--weights", default="demo,random")
    ap.add_argument("--json", default="bench/results/structured.json")
    a = ap.parse_args()
    demo, tok = load()
    mx.random.seed(1)
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=None)
    random_weights = Model(replace(demo.args, intermediate_size=128, **small))
    mx.eval(random_weights.parameters())
    models = {"demo": demo, "random": random_weights}
    rows = [row(models[w], tok, w, mode, a.n) for w in a.weights.split(",") for mode in a.modes.split(",")]
    out = {
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
        "rows": rows,
    }
    Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
