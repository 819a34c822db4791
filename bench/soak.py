"""Soak the OpenAI-compatible server: N requests (mixed streamed / not) from C concurrent clients on
loopback, with and without batching, side by side.

    python bench/soak.py --model demo --requests 48 --concurrency 1,4,8 --max-batch 1,8 \
        --json bench/results/soak_demo.json
    python bench/soak.py --model small --requests 16 --concurrency 1,4,8 --max-batch 1,8 \
        --json bench/results/soak_small.json

`--max-batch 1` is serving one request at a time; larger values let compatible requests share the
running batch. `demo` is the bundled model (short answers, each block in about one forward); `small` is a
random-weight model of the `bench --shape small` dimensions with the demo's tokenizer (every request
writes its whole budget, one token per forward: compute is what matters there). Every answer is checked
against the same prompt decoded directly, alone (T = 0 is deterministic); the report gives requests/s and
latency percentiles per (max_batch, concurrency).
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import openai

from illada_mlx.bench import SHAPES
from illada_mlx.config import ModelArgs
from illada_mlx.engine import generate_text
from illada_mlx.load import load
from illada_mlx.model import Model
from illada_mlx.server import Scheduler, make_app, make_server
from training.demo_tasks import held_out_set


def small_model(demo_args) -> Model:
    """The small bench shape with random weights, sized to the demo tokenizer's vocabulary and ids."""
    a = demo_args
    args = ModelArgs(
        **{**SHAPES["small"], "vocab_size": a.vocab_size},
        max_position_embeddings=a.max_position_embeddings,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        mask_token_id=a.mask_token_id,
        eos_token_id=a.eos_token_id,
        eot_token_id=a.eot_token_id,
        pad_token_id=a.pad_token_id,
    )
    mx.random.seed(0)
    model = Model(args)
    mx.eval(model.parameters())
    return model


def run(model, tok, items, expected, settings, max_batch, concurrency, requests) -> dict:
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        port = so.getsockname()[1]
    engine = Scheduler(model, tok, "soak", max_queue=max(16, concurrency * 2), max_batch=max_batch)
    server = make_server(make_app(engine), "127.0.0.1", port, "error")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=900)

    def one(i):
        p = items[i % len(items)]
        t0 = time.perf_counter()
        kw = dict(
            model="soak",
            messages=[{"role": "user", "content": p}],
            max_tokens=settings["max_tokens"],
            extra_body={"diffusion": settings["diffusion"]},
        )
        if i % 2:
            text = "".join(
                c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw) if c.choices
            )
        else:
            text = client.chat.completions.create(**kw).choices[0].message.content
        return time.perf_counter() - t0, text == expected[p]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        res = list(ex.map(one, range(requests)))
    wall = time.perf_counter() - t0
    server.should_exit = True
    thread.join(timeout=10)
    lat = sorted(r[0] for r in res)
    sizes = engine.batch_sizes
    return {
        "max_batch": max_batch,
        "concurrency": concurrency,
        "requests": requests,
        "correct": sum(r[1] for r in res),
        "wall_s": round(wall, 2),
        "requests_per_s": round(requests / wall, 3),
        "latency_s": {
            "p50": round(statistics.median(lat), 3),
            "p90": round(lat[int(0.9 * len(lat)) - 1], 3),
            "max": round(lat[-1], 3),
        },
        "blocks_run": len(sizes),
        "mean_rows_per_block": round(sum(sizes) / max(len(sizes), 1), 2),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["demo", "small"], default="demo")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--max-batch", default="1,8")
    ap.add_argument("--json", default="bench/results/soak_demo.json")
    a = ap.parse_args()
    model, tok = load()
    if a.model == "small":
        model = small_model(model.args)
        settings = {"max_tokens": 32, "diffusion": {"mode": "fast", "block_length": 16}}
    else:
        settings = {"max_tokens": 32, "diffusion": {"mode": "fast"}}
    items = [p for _, p, _ in held_out_set(5)]
    expected = {
        p: generate_text(
            model, tok, [{"role": "user", "content": p}], max_tokens=settings["max_tokens"], **settings["diffusion"]
        )
        for p in items
    }
    runs = []
    for c in [int(x) for x in a.concurrency.split(",")]:
        for b in [int(x) for x in a.max_batch.split(",")]:
            r = run(model, tok, items, expected, settings, b, c, a.requests)
            print(json.dumps(r), file=sys.stderr, flush=True)
            runs.append(r)
    out = {
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "platform": platform.platform(),
            "cpus": __import__("os").cpu_count(),
            "mlx": mx.__version__,
            "device": str(mx.default_device()),
        },
        "model": a.model,
        "settings": settings,
        "prompts": len(items),
        "runs": runs,
    }
    print(json.dumps(out, indent=2))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
