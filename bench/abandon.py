"""Clients that leave: streaming clients that disconnect at random beside well-behaved ones.

    python bench/abandon.py --seconds 60 --leavers 50 --steady 5 --json bench/results/abandon.json

The model is the `bench --shape small` dimensions with random weights and the demo's tokenizer (soak.py's
`small_model`): it never says EOS, so every request writes its whole budget, one token per forward. A
well-behaved client streams a 2-block reply (32 tokens) again and again; a leaver asks for 8 blocks
(128 tokens) and closes its connection after a random 0..2 s (the leavers run in a process of their own,
as other clients would: their threads do not take the server's interpreter). First the well-behaved
clients run alone (`--alone-seconds`), then beside the leavers. Reported: the well-behaved clients' time to their first
block (p50 / p90 / max) alone and beside the leavers, their requests per second, the leavers' requests,
and, once every client has stopped at the end, the forwards the server still ran for requests nobody
reads any more (the model's forwards are counted); per row dropped mid-decode, whether the step it left
after began after its client had gone (server.Scheduler.late_steps: 0 means it stopped within the step it
was on), and the time between forwards.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import random
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import mlx.core as mx
from soak import small_model  # bench/soak.py, beside this script

from illada_mlx.load import load
from illada_mlx.server import Scheduler, make_app, make_server

STEADY = {"max_tokens": 32, "stream": True, "diffusion": {"mode": "fast", "block_length": 16}}
LEAVER = {"max_tokens": 128, "stream": True, "diffusion": {"mode": "fast", "block_length": 16}}


class Counting:
    """The model, counting its forwards with their times."""

    def __init__(self, model):
        self.model, self.args, self.times = model, model.args, []

    def __call__(self, *a, **kw):
        self.times.append(time.perf_counter())
        return self.model(*a, **kw)


def steady(url, stop, first_blocks, done):
    """Stream 2-block replies until `stop`; the time to each reply's first content chunk."""
    body = {"messages": [{"role": "user", "content": "reverse hello"}], **STEADY}
    with httpx.Client(timeout=600) as h:
        while not stop.is_set():
            t0 = time.perf_counter()
            first = None
            with h.stream("POST", f"{url}/chat/completions", json=body) as r:
                for line in r.iter_lines():
                    if first is None and '"content": "' in line and '"content": ""' not in line:
                        first = time.perf_counter() - t0
            if first is not None:
                first_blocks.append(first)
                done.append(time.perf_counter())


def leaver(url, stop, seed, count):
    """Ask for 8 blocks, read for a random 0..2 s, close; again until `stop`. The read timeout is the time
    left, so that it leaves on time while no chunk comes (queued, or mid-block)."""
    rng = random.Random(seed)
    body = {"messages": [{"role": "user", "content": "sort 3 1 2"}], **LEAVER}
    with httpx.Client() as h:  # one client (its TLS set-up) per leaver; a closed stream closes its connection
        while not stop.is_set():
            wait = rng.uniform(0, 2)
            leave = time.perf_counter() + wait
            how = "left"
            try:
                with h.stream(
                    "POST", f"{url}/chat/completions", json=body, timeout=httpx.Timeout(5, read=max(wait, 0.01))
                ) as r:
                    lines = r.iter_lines()
                    while time.perf_counter() < leave:
                        if next(lines, None) is None:
                            how = f"ended ({r.status_code})"
                            break
            except httpx.ReadTimeout:
                pass
            except httpx.HTTPError as e:
                how = type(e).__name__
            count.append(how)


def leavers(url, n, seconds, ready, out):
    """In a process of their own (the server's process keeps its interpreter to itself): n leavers for
    `seconds` once `ready` is set here."""
    stop, left = threading.Event(), []
    threads = [threading.Thread(target=leaver, args=(url, stop, i, left)) for i in range(n)]
    ready.set()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    out.put({how: left.count(how) for how in sorted(set(left))})


def phase(url, seconds, n_steady, n_leavers):
    stop, first, done = threading.Event(), [], []
    threads = [threading.Thread(target=steady, args=(url, stop, first, done)) for _ in range(n_steady)]
    ctx = multiprocessing.get_context("spawn")
    ready, out = ctx.Event(), ctx.Queue()
    child = ctx.Process(target=leavers, args=(url, n_leavers, seconds, ready, out)) if n_leavers else None
    if child is not None:
        child.start()
        ready.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    left = out.get() if child is not None else {}
    if child is not None:
        child.join()
    return first, len(done) / (time.perf_counter() - t0), left, time.perf_counter()


def pct(xs):
    xs = sorted(xs)
    return (
        {
            "n": len(xs),
            "p50": round(statistics.median(xs), 3),
            "p90": round(xs[int(0.9 * len(xs)) - 1], 3),
            "max": round(xs[-1], 3),
        }
        if xs
        else {"n": 0}
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--alone-seconds", type=float, default=20)
    ap.add_argument("--leavers", type=int, default=50)
    ap.add_argument("--steady", type=int, default=5)
    ap.add_argument("--json", default="bench/results/abandon.json")
    a = ap.parse_args()
    demo, tok = load()
    model = Counting(small_model(demo.args))
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        port = so.getsockname()[1]
    engine = Scheduler(model, tok, "abandon", max_queue=4 * (a.leavers + a.steady), max_batch=8)
    server = make_server(make_app(engine), "127.0.0.1", port, "error")
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1"
    alone, alone_rps, _, _ = phase(url, a.alone_seconds, a.steady, 0)
    beside, beside_rps, leavers, end = phase(url, a.seconds, a.steady, a.leavers)
    time.sleep(3)  # whatever still runs for nobody
    after = [t for t in model.times if t > end]
    steps = [b - a for a, b in zip(model.times, model.times[1:]) if b - a < 5]  # a forward's time, idle gaps out
    out = {
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"platform": platform.platform(), "cpus": __import__("os").cpu_count(), "mlx": mx.__version__},
        "first_block_s": {"alone": pct(alone), "beside_leavers": pct(beside)},
        "steady_replies_per_s": {"alone": round(alone_rps, 3), "beside_leavers": round(beside_rps, 3)},
        "leaver_requests": sum(leavers.values()),
        "leaver_outcomes": leavers,
        "forwards_after_every_client_stopped": len(after),
        "dropped_mid_decode": {
            "rows": len(engine.late_steps),
            "steps_begun_after_the_client_left": {
                "max": max(engine.late_steps, default=0),
                "rows_with_one": sum(engine.late_steps),
            },
        },
        "step_s": pct(steps),
    }
    print(json.dumps(out, indent=2))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))
    server.should_exit = True


if __name__ == "__main__":
    main()
