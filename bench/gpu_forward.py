"""8B-shape forward timings on a GPU (MLX CUDA or Metal): a 32-token block, and a token-cache step (16
scattered positions of the block), against 0/512/2048 cached tokens, bf16 and 4-bit, with the
weight-bandwidth roofline; and the candidates kernel vs the reference.

    python bench/gpu_forward.py --json out.json        (run by bench/device_check.sh)
"""

from __future__ import annotations

import argparse
import json
import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from illada_mlx.bench import machine, random_model
from illada_mlx.cache import BlockCache
from illada_mlx.kernels import candidates_reference
from illada_mlx.kernels_gpu import backend, candidates_kernel


def timed(f, n=10):
    mx.eval(f())
    t0 = time.perf_counter()
    for _ in range(n):
        mx.eval(f())
    return 1000 * (time.perf_counter() - t0) / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="gpu_8b.json")
    ap.add_argument("--shape", default="8b", help="tiny/small to try the script on a CPU")
    ap.add_argument("--bandwidth-gbs", type=float, default=None, help="HBM bandwidth (default: by device name)")
    a = ap.parse_args()
    info = machine()
    name = str(info.get("device_info", {}).get("device_name", ""))
    bw = a.bandwidth_gbs or (4800.0 if "H200" in name else 3350.0 if "H100" in name else 400.0)
    res = {"machine": info, "bandwidth_gbs": bw, "rows": []}
    kind = backend()
    if kind:
        lg = mx.random.normal((32, 155136)).astype(mx.bfloat16)
        res["candidates_ms"] = {
            "reference": timed(lambda: candidates_reference(lg)[1]),
            kind: timed(lambda: candidates_kernel(lg, kind)[1]),
        }
        print("candidates (32 x 155136):", res["candidates_ms"])
    for q in (None, 4):
        model = random_model(a.shape, mx.bfloat16)
        if q:
            nn.quantize(model, group_size=32, bits=q)
        mx.eval(model.parameters())
        wbytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
        for ctx in (0, 512, 2048):
            L = ctx + 32
            ids = mx.random.randint(0, model.args.vocab_size, (1, L))
            cache = BlockCache()
            model(ids, cache=cache, logits_at=mx.arange(ctx, L))
            mx.eval(cache.state())
            at = mx.arange(0, 32)
            pos = mx.arange(ctx, L, 2)[None]  # a token-cache step: half the block (its average query)
            steps = {
                "block": lambda: model(ids[:, ctx:], cache=cache, offset=ctx, logits_at=at),
                "token16": lambda: model(
                    mx.take_along_axis(ids, pos, axis=1), cache=cache, offset=pos, logits_at=mx.arange(16)
                ),
            }
            roof = 1000 * wbytes / (bw * 1e9)
            for step, forward in steps.items():
                ms = timed(forward)
                row = {
                    "weights": "bf16" if q is None else f"{q}bit",
                    "context": ctx,
                    "block": 32,
                    "step": step,
                    "ms_per_forward": ms,
                    "weight_bytes": wbytes,
                    "roofline_ms": roof,
                    "x_roofline": ms / roof,
                }
                res["rows"].append(row)
                print(row, flush=True)
        model = None  # free it before the next precision's copy
        mx.clear_cache()
    with open(a.json, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
