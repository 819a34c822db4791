"""`illada-mlx bench` as a library call: a `BenchConfig` in, the results (the JSON the command writes) out.

The caller loads checkpoints (`load(path, group) -> (model, tokenizer)`: the command line converts the demo
model on first use) and prints; everything between, the prompts, the runs per mode and the baselines, is here.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

from . import bench as B
from . import distributed as dist


@dataclass
class BenchConfig:
    """What to measure: `modes` (presets) at every budget of `gen_lengths`, on a checkpoint (`model_path`,
    None: the demo model) or a random model of `shape`; caches (None: each mode's own), refresh policies and
    baselines as names; `parallel` under mlx.launch: "data" splits the runs, "tensor" the model."""

    modes: list[str]
    gen_lengths: list[int]
    model_path: Optional[str] = None
    shape: Optional[str] = None
    dtype: str = "float32"
    block_length: int = 32
    prompt_lengths: Union[str, list[int]] = "auto"
    repeats: int = 1
    refreshes: list[str] = field(default_factory=lambda: ["drift"])
    caches: tuple = (None,)
    baselines: list[str] = field(default_factory=list)
    parallel: str = "data"


def check(cfg: BenchConfig, plot: bool) -> None:
    """What bench can refuse before a model loads: a baseline or the plot whose package is missing."""
    B.require_baselines(cfg.baselines)
    if plot:
        B.require_matplotlib()


def model_for(cfg: BenchConfig, load: Callable, group, tensor: bool):
    """(model, tokenizer or None, the model's name in the results)."""
    import mlx.core as mx

    if not cfg.shape:
        model, tok = load(cfg.model_path, group if tensor else None)
        return model, tok, cfg.model_path or "illada-demo"
    model = B.random_model(cfg.shape, getattr(mx, cfg.dtype))  # the same seed: the same weights on every rank
    if tensor:
        model.shard(group)
        mx.eval(model.parameters())
    return model, None, f"random {cfg.shape} ({cfg.dtype})"


def prompts_for(cfg: BenchConfig, model, tok) -> dict[int, list[int]]:
    """length -> prompt ids: the demo model's longest in-distribution questions (auto, with a tokenizer), or
    random tokens of each asked length (auto without one: 16 and 128)."""
    from .engine import build_prompt

    if cfg.prompt_lengths == "auto" and tok is not None:
        texts = ["reverse qwerty", "sort 9 3 7 1 4 2"]  # the demo model's longest in-distribution answers
        return {len(p): p for p in (build_prompt(tok, [{"role": "user", "content": t}]) for t in texts)}
    import numpy as np

    lens = [16, 128] if cfg.prompt_lengths == "auto" else cfg.prompt_lengths
    rng = np.random.default_rng(0)
    return {n: rng.integers(10, model.args.vocab_size, n).tolist() for n in lens}


def baselines(cfg: BenchConfig, model, first_prompt, tensor: bool, log) -> list[dict]:
    """The official PyTorch loop and mlx-lm's autoregressive decode at every budget, as asked."""
    runs = []
    for gen in cfg.gen_lengths:
        if "torch" in cfg.baselines and tensor:
            log("torch_official: skipped under --parallel tensor (it needs the whole model on one rank)")
        elif "torch" in cfg.baselines:
            r = B.bench_torch(model, first_prompt, gen, cfg.block_length, log)
            runs += [r] if r else []
        if "ar" in cfg.baselines:
            r = B.bench_ar(model.args, len(first_prompt), gen, log)
            runs += [r] if r else []
    return runs


def run(cfg: BenchConfig, load: Callable, group, log=print) -> Optional[dict]:
    """Every run of `cfg`, with the machine's description: the results on rank 0, None on the other ranks."""
    from .backend import backend_name, compute_dtype

    tensor = cfg.parallel == "tensor" and group.size() > 1
    model, tok, name = model_for(cfg, load, group, tensor)
    prompts = prompts_for(cfg, model, tok)
    grid = B.ModeGrid(
        cfg.modes,
        cfg.gen_lengths,
        cfg.repeats,
        cfg.block_length,
        cfg.refreshes,
        cfg.caches,
        ban_eos=cfg.shape is not None,
    )
    runs = B.bench_modes(model, prompts, grid, tok, log, group=group if group.size() > 1 and not tensor else None)
    if not dist.is_main(group):
        return None
    if any(r["output_tokens"] == 0 for r in runs):
        log(
            "note: rows with out 0 wrote nothing (the model ended its reply at once, as a trained model does "
            "after random tokens): their tok/s is '-'; --prompt-lengths auto or --shape measure whole replies"
        )
    runs += baselines(cfg, model, next(iter(prompts.values())), tensor, log)
    return {
        "model": name,
        "gen_lengths": cfg.gen_lengths,
        "block_length": cfg.block_length,
        "repeats": cfg.repeats,
        "date": time.strftime("%Y-%m-%d"),
        "machine": B.machine(),
        "runs": runs,
        "ranks": group.size(),
        "parallel": cfg.parallel if group.size() > 1 else None,
        "parameter_bytes_per_rank": B.parameter_bytes(model),
        "compute_dtype": compute_dtype(model),
        "backend": backend_name(),
    }


def save(result: dict, json_path: Optional[Path], plot_path: Optional[Path]) -> None:
    """The results as JSON and as a plot, where asked."""
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2))
    if plot_path:
        B.plot(result, str(plot_path))
