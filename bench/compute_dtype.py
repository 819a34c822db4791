"""The 8B-shape 4-bit forward per token position, in the dtype a conversion stores (bfloat16: what loading
did before the compute dtype was chosen per backend) and in the dtype `load` now picks on this device
(backend.preferred_dtype: float32 on the CPU).

A few transformer layers of iLLaDA-8B's true shape (d 4096, FFN 14336, 32/8 heads) and the tied 155,136-row
head, quantized as `convert -q` does (affine 4-bit, group 64, scales in the source's bfloat16), run on a
canvas of --positions tokens; the whole model's time per position is 32 × a layer's + the head's.

    python bench/compute_dtype.py --layers 1 --positions 16 --json bench/results/compute_dtype_8b_4bit.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from illada_mlx.backend import backend_name, cast_floats, compute_dtype, preferred_dtype
from illada_mlx.bench import machine, random_model
from illada_mlx.model import Model

FULL_LAYERS = 32


def quantized_model(layers: int) -> Model:
    model = random_model("8b", mx.bfloat16, layers=layers)
    nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    return model


def timed(fn, repeats: int) -> float:
    mx.eval(fn())  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        mx.eval(fn())
    return (time.perf_counter() - t0) / repeats


def measure(model: Model, positions: int, repeats: int) -> dict:
    dt = getattr(mx, compute_dtype(model))
    h = (mx.random.normal((1, positions, model.args.hidden_size)) * 0.1).astype(dt)

    def layers():
        x = h
        for i, layer in enumerate(model.layers):
            x = layer(x, None, None, i, 0)
        return x

    def head():
        return model.model.embed_tokens.as_linear(model.model.norm(h))

    t_layers, t_head = timed(layers, repeats), timed(head, repeats)
    per_layer = t_layers / len(model.layers) / positions
    per_head = t_head / positions
    return {
        "compute_dtype": compute_dtype(model),
        "layer_s_per_position": per_layer,
        "head_s_per_position": per_head,
        "model_s_per_position": FULL_LAYERS * per_layer + per_head,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--positions", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    model = quantized_model(a.layers)
    before = measure(model, a.positions, a.repeats)
    print("stored (bfloat16):", json.dumps(before), flush=True)
    cast_floats(model, preferred_dtype("auto"))
    mx.eval(model.parameters())
    after = measure(model, a.positions, a.repeats)
    print(f"auto on {backend_name()}:", json.dumps(after), flush=True)
    speedup = before["model_s_per_position"] / after["model_s_per_position"]
    print(
        f"8B 4-bit forward per token position: {before['model_s_per_position']:.2f} s -> "
        f"{after['model_s_per_position']:.2f} s ({speedup:.1f}x)"
    )
    if a.json:
        result = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine(),
            "backend": backend_name(),
            "layers_run": a.layers,
            "positions": a.positions,
            "repeats": a.repeats,
            "quantization": "affine 4-bit, group 64, bfloat16 scales",
            "before": before,
            "after": after,
            "speedup": speedup,
        }
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
