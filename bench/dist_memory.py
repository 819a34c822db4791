"""Per-rank memory of a tensor-parallel load, from a converted directory (random weights of a bench shape).

    python bench/dist_memory.py make DIR --shape small          # once: write the MLX directory
    python bench/dist_memory.py measure DIR                      # one process
    mlx.launch --backend ring -n 2 --python PY bench/dist_memory.py measure DIR --json OUT.json

Each rank loads the directory with `load_model(DIR, group=...)` and reports the bytes of the arrays its
model holds, MLX's active memory after the load and its peak during the load; rank 0 prints them all.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from illada_mlx import distributed as dist
from illada_mlx.bench import SHAPES, machine, parameter_bytes, random_model


def make(path: Path, shape: str, dtype: str) -> None:
    model = random_model(shape, getattr(mx, dtype))
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (path / "config.json").write_text(json.dumps(model.args.to_config(), indent=2))
    print(f"wrote {path} ({shape}, {dtype}, {parameter_bytes(model) / 2**20:.1f} MiB)")


def measure(path: Path, out) -> None:
    from illada_mlx.load import load_model

    g = dist.group()
    mx.reset_peak_memory()
    model = load_model(path, group=g)
    mine = {
        "rank": g.rank(),
        "parameter_bytes": parameter_bytes(model),
        "active_bytes": mx.get_active_memory(),
        "peak_bytes_during_load": mx.get_peak_memory(),
    }
    ranks = dist.all_objects(g, mine)
    if g.rank() == 0:
        result = {"model": str(path), "ranks": ranks, "size": g.size(), "machine": machine()}
        print(json.dumps(result, indent=2))
        if out:
            Path(out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["make", "measure"])
    p.add_argument("dir")
    p.add_argument("--shape", choices=list(SHAPES), default="small")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    make(Path(a.dir), a.shape, a.dtype) if a.what == "make" else measure(Path(a.dir), a.json)
