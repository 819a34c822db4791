"""Soak the OpenAI-compatible server: N requests (mixed streamed / not) from C concurrent clients on loopback.

    python bench/soak.py --requests 200 --concurrency 8 --json bench/results/soak.json

Checks every answer against the same prompt decoded directly (T = 0 is deterministic) and reports
latency percentiles, throughput and the server's peak memory.
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

import openai
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_tasks import held_out_set  # noqa: E402

from illada_mlx.load import load  # noqa: E402
from illada_mlx.engine import generate_text  # noqa: E402
from illada_mlx.server import Engine, make_app  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--json", default="bench/results/soak.json")
    a = ap.parse_args()
    model, tok = load()
    items = [p for _, p, _ in held_out_set(5)]
    expected = {p: generate_text(model, tok, [{"role": "user", "content": p}], mode="fast", max_tokens=32)
                for p in items}
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        port = so.getsockname()[1]
    engine = Engine(model, tok, "illada-demo", max_queue=a.concurrency * 2)
    server = uvicorn.Server(uvicorn.Config(make_app(engine), host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)

    def one(i):
        p = items[i % len(items)]
        t0 = time.perf_counter()
        msgs = [{"role": "user", "content": p}]
        kw = dict(model="illada-demo", messages=msgs, max_tokens=32, extra_body={"diffusion": {"mode": "fast"}})
        if i % 2:
            text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw))
        else:
            text = client.chat.completions.create(**kw).choices[0].message.content
        return time.perf_counter() - t0, text == expected[p]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(a.concurrency) as ex:
        res = list(ex.map(one, range(a.requests)))
    wall = time.perf_counter() - t0
    server.should_exit = True
    lat = sorted(r[0] for r in res)
    out = {
        "command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
        "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count()},
        "requests": a.requests, "concurrency": a.concurrency, "completed": len(res),
        "correct": sum(r[1] for r in res), "wall_s": round(wall, 2), "requests_per_s": round(a.requests / wall, 2),
        "latency_s": {"p50": round(statistics.median(lat), 3), "p90": round(lat[int(0.9 * len(lat)) - 1], 3),
                      "max": round(lat[-1], 3)},
        "served": engine.served,
    }
    print(json.dumps(out, indent=2))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
