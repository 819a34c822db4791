"""`illada-mlx bench`: tokens/s, forwards, tokens per forward, memory, per mode, against baselines.

Each run: one warm-up, then the median of `repeats` timed runs, for every (mode, prompt length).
Baselines in the same run: "exact" is the official fixed-canvas algorithm on the same MLX model;
"torch_official" is the official PyTorch decoding loop on a from-spec torch model with the same weights
(needs torch); "mlx_lm_ar" is an autoregressive Llama of the same size decoding the same number of
tokens with mlx-lm (the bar a diffusion model must beat).
"""

from __future__ import annotations

import platform
import statistics
import time
import zlib
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import mlx.core as mx
import numpy as np

from .config import IlladaError, ModelArgs
from .decode import BlockDone, decode, run
from .model import Model
from .spec import PRESETS, make_spec

SHAPES = {  # iLLaDA-8B's ratios: head_dim 128 → 32 here; 4 query heads per KV head; FFN 3.5×; vocab ≈ 38×d
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        intermediate_size=224,
        vocab_size=2432,
    ),
    "small": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=896,
        vocab_size=9728,
    ),
    "8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=155136,
    ),
}


def random_model(shape: str, dtype=mx.float32, seed: int = 0, layers: Optional[int] = None) -> Model:
    """Random weights of a SHAPES shape (`layers`: that many of its layers instead)."""
    dims = SHAPES[shape] if layers is None else {**SHAPES[shape], "num_hidden_layers": layers}
    args = ModelArgs(
        **dims,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        mask_token_id=5,
        eos_token_id=2,
        pad_token_id=2,
    )
    mx.random.seed(seed)
    model = Model(args)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def parameter_bytes(model) -> int:
    """Bytes of the arrays the model holds (on this rank, when tensor-parallel)."""
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def machine() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
    }
    try:
        info["device_info"] = {k: v for k, v in mx.device_info().items() if isinstance(v, (int, float, str))}
    except Exception:
        pass
    return info


def _one(model, prompt, spec) -> dict:
    first = []
    t0 = time.perf_counter()

    def on(ev):
        if isinstance(ev, BlockDone) and not first:
            first.append(time.perf_counter() - t0)

    g = run(decode(model, [prompt], spec), on)
    st = g.stats
    crc = zlib.crc32(np.array(g.tokens[0], dtype=np.int64).tobytes())  # what was written, to compare runs
    out = max(st.output_tokens, 1)
    # ideal: every forward runs one block (block_length tokens) and nothing else
    # a run that wrote nothing has no tokens/s (not 1 / wall, which reads as a slow run)
    return {
        "tokens_per_s": st.output_tokens / st.wall_s if st.output_tokens else None,
        "nfe": st.nfe,
        "output_tokens": st.output_tokens,
        "tokens_per_forward": st.output_tokens / max(st.nfe, 1),
        "processed_per_output_token": st.processed / out,
        "processed_vs_ideal": st.processed / max(st.nfe * spec.block_length, 1),
        "ms_per_forward": 1000 * st.wall_s / max(st.nfe, 1),
        "time_to_first_block_s": first[0] if first else None,
        "wall_s": st.wall_s,
        "peak_memory_bytes": st.peak_memory_bytes,
        "tokens_crc32": crc,
    }


def _median(runs: list[dict]) -> dict:
    return {k: (statistics.median([r[k] for r in runs]) if runs[0][k] is not None else None) for k in runs[0]}


@dataclass(frozen=True)
class ModeGrid:
    """What bench_modes runs: every gen length × mode × cache × block refresh policy, each the median of
    `repeats` timed runs, with the mode's preset at `block_length` and one step per token in a block. The
    caches (None: the preset's) and refresh policies matter only to modes with a cache; the full refresh,
    the baseline, runs with the first cache only. ban_eos (random weights): every run writes its whole
    budget, so the rows compare equal outputs."""

    modes: Sequence[str]
    gen_lengths: Sequence[int]
    repeats: int = 1
    block_length: int = 32
    refreshes: Sequence[str] = ("drift",)
    caches: Sequence[Optional[str]] = (None,)
    ban_eos: bool = False


class _Case(NamedTuple):
    """One run of the grid: gen length, mode, cache (None: the preset's), block refresh, prompt length."""

    gen: int
    mode: str
    cache: Optional[str]
    refresh: str
    prompt_len: int


def _grid_cases(grid: ModeGrid, prompt_lens) -> list[_Case]:
    """The grid's runs in the order one process runs them."""
    cases = []
    for gen in grid.gen_lengths:
        for name in grid.modes:
            if PRESETS[name].settings["cache"] == "none":
                cases += [_Case(gen, name, None, grid.refreshes[0], plen) for plen in prompt_lens]
            else:
                cases += [
                    _Case(gen, name, c, r, plen)
                    for i, c in enumerate(grid.caches)
                    for r in grid.refreshes
                    if not (i and r == "full")
                    for plen in prompt_lens
                ]
    return cases


def _bench_case(model, tokenizer, prompt: list[int], case: _Case, grid: ModeGrid) -> dict:
    """One warm-up of a block, then the median of grid.repeats timed runs, with what ran."""
    kw = dict(
        mode=case.mode,
        block_length=grid.block_length,
        steps_per_block=grid.block_length,
        seed=0,
        block_refresh=case.refresh,
        logits_eos_inf=grid.ban_eos,
        cache=case.cache,
    )
    spec = make_spec(model, tokenizer, case.prompt_len, max_tokens=case.gen, **kw)
    warm_up = make_spec(model, tokenizer, case.prompt_len, max_tokens=min(case.gen, grid.block_length), **kw)
    _one(model, prompt, warm_up)
    r = _median([_one(model, prompt, spec) for _ in range(grid.repeats)])
    r.update(
        mode=case.mode,
        gen_length=case.gen,
        prompt_tokens=case.prompt_len,
        block_length=grid.block_length,
        cache=spec.cache,
        block_refresh=spec.block_refresh if spec.cache != "none" else None,
        rule=spec.rule,
        canvas=spec.canvas,
    )
    return r


def _row_line(r: dict) -> str:
    """A result row as one log line."""
    return (
        f"gen {r['gen_length']:5d} {r['mode']:10s} {r['cache']:6s} {r['block_refresh'] or '-':6s} "
        f"prompt {r['prompt_tokens']:5d}: "
        f"{format(r['tokens_per_s'], '8.2f') if r['tokens_per_s'] else '       -'} tok/s  nfe {r['nfe']:4d}  "
        f"{r['tokens_per_forward']:.2f} tok/fwd  "
        f"{r['processed_per_output_token']:8.1f} processed/out  {r['processed_vs_ideal']:.2f}x ideal  "
        f"{r['ms_per_forward']:.1f} ms/fwd  first block {r['time_to_first_block_s']:.2f}s  "
        f"peak {r['peak_memory_bytes'] / 1e6:.0f} MB"
    )


def bench_modes(
    model, prompts: dict[int, list[int]], grid: ModeGrid, tokenizer=None, log=print, group=None
) -> list[dict]:
    """A result row for every run of `grid` (see ModeGrid) on every prompt (by its length). group (data
    parallel under mlx.launch): each rank runs a contiguous share of the runs and every rank gets all the
    rows, in the order one process would give them."""
    from .distributed import gather, split

    cases = _grid_cases(grid, prompts)
    if group is not None:
        cases = split(cases, group.rank(), group.size())
    rows = []
    for case in cases:
        rows.append(_bench_case(model, tokenizer, prompts[case.prompt_len], case, grid))
        log(_row_line(rows[-1]))
    return rows if group is None else gather(group, rows)


TABLE_HEAD = (
    "gen",
    "mode",
    "cache",
    "refresh",
    "prompt",
    "out",
    "tok/s",
    "forwards",
    "tok/fwd",
    "proc/out",
    "vs ideal",
    "ms/fwd",
    "1st blk s",
    "peak MB",
)
BASELINE_MODES = ("exact", "torch_official", "mlx_lm_ar")  # rows that are compared against, never compared


def _num(v, f: str) -> str:
    return "-" if v is None else format(v, f)


def _cells(r: dict) -> tuple:
    """A result row's table cells, in TABLE_HEAD's order."""
    peak = r["peak_memory_bytes"] / 1e6 if r.get("peak_memory_bytes") else None
    return (
        r["gen_length"],
        r["mode"],
        r.get("cache") or "-",
        r.get("block_refresh") or "-",
        r["prompt_tokens"],
        r["output_tokens"],
        _num(r["tokens_per_s"], ".2f"),
        r["nfe"],
        _num(r["tokens_per_forward"], ".2f"),
        _num(r["processed_per_output_token"], ".1f"),
        _num(r.get("processed_vs_ideal"), ".2f"),
        _num(r["ms_per_forward"], ".1f"),
        _num(r.get("time_to_first_block_s"), ".2f"),
        _num(peak, ".0f"),
    )


def _same_work(a: dict, b: dict) -> bool:
    return a["prompt_tokens"] == b["prompt_tokens"] and a["gen_length"] == b["gen_length"]


def _base_row(r: dict, runs: list[dict]) -> Optional[dict]:
    """The row `r` is compared against: exact on the same work, else (a cached row) its mode's first
    full-refresh row on the same work; None when there is none."""
    base = next((x for x in runs if x["mode"] == "exact" and _same_work(x, r)), None)
    if r["mode"] not in BASELINE_MODES and base is None and r.get("block_refresh"):
        full = (x for x in runs if x["mode"] == r["mode"] and x.get("block_refresh") == "full" and _same_work(x, r))
        base = next(full, None)
    return base


def _comparison(r: dict, base: dict) -> str:
    what = "exact" if base["mode"] == "exact" else f"{base['mode']} {base['cache']} full refresh"
    return (
        f"gen {r['gen_length']} {r['mode']} {r['cache']} {r.get('block_refresh') or ''} vs {what} (prompt "
        f"{r['prompt_tokens']}): {r['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s, "
        f"{base['processed_per_output_token'] / r['processed_per_output_token']:.2f}x fewer "
        "processed tokens per output token"
    )


def table(runs: list[dict]) -> str:
    """The result rows as a text table, then each mode against exact (or, without an exact row, each cached
    row against the mode's first full-refresh row) on the same prompt and length."""
    lines = [" ".join(f"{h:>10s}" for h in TABLE_HEAD)]  # a space between cells: a 10-letter mode stays apart
    lines += [" ".join(f"{str(c):>10s}" for c in _cells(r)) for r in runs]
    for r in runs:
        base = _base_row(r, runs)
        if (
            base is not None
            and base is not r
            and r["mode"] not in BASELINE_MODES
            and r["tokens_per_s"]
            and base["tokens_per_s"]
        ):  # a row that wrote nothing has no ratio
            lines.append(_comparison(r, base))
    return "\n".join(lines)


def bench_torch(model, prompt, gen_length: int, block_length: int = 32, log=print) -> Optional[dict]:
    """The official PyTorch loop on the same weights (tied-head iLLaDA layout only)."""
    try:
        import torch

        from .torch_ref import from_mlx, official_generate
    except ImportError:
        log("torch_official: skipped (pip install 'illada-mlx[torch]')")
        return None
    if not model.args.tie_word_embeddings:
        return None
    tm = from_mlx(model)
    p = torch.tensor([prompt])
    official_generate(
        tm, p, steps=block_length, gen_length=block_length, block_length=block_length, mask_id=model.args.mask_token_id
    )
    t0 = time.perf_counter()
    x, nfe = official_generate(
        tm, p, steps=gen_length, gen_length=gen_length, block_length=block_length, mask_id=model.args.mask_token_id
    )
    wall = time.perf_counter() - t0
    toks = x[0, len(prompt) :].tolist()
    eos = model.args.eos_token_id
    out = toks.index(eos) if eos in toks else len(toks)
    r = {
        "mode": "torch_official",
        "gen_length": gen_length,
        "prompt_tokens": len(prompt),
        "output_tokens": out,
        "processed_vs_ideal": (len(prompt) + gen_length) / block_length,
        "tokens_per_s": max(out, 1) / wall,
        "nfe": nfe,
        "tokens_per_forward": out / nfe,
        "processed_per_output_token": nfe * (len(prompt) + gen_length) / max(out, 1),
        "ms_per_forward": 1000 * wall / nfe,
        "time_to_first_block_s": None,
        "wall_s": wall,
        "peak_memory_bytes": None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    log(f"torch_official prompt {len(prompt)}: {r['tokens_per_s']:.2f} tok/s, {r['ms_per_forward']:.1f} ms/fwd")
    return r


def bench_ar(args: ModelArgs, prompt_len: int, gen_length: int, log=print) -> Optional[dict]:
    """An autoregressive Llama of the same size in mlx-lm, decoding gen_length tokens (EOS ignored)."""
    try:
        from mlx_lm.generate import generate_step
        from mlx_lm.models import llama
    except ImportError:
        return None
    la = llama.ModelArgs(
        model_type="llama",
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers,
        intermediate_size=args.intermediate_size,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_key_value_heads,
        rms_norm_eps=args.rms_norm_eps,
        vocab_size=args.vocab_size,
        rope_theta=args.rope_theta,
        tie_word_embeddings=True,
    )
    m = llama.Model(la)
    mx.eval(m.parameters())
    prompt = mx.array(np.random.default_rng(0).integers(10, args.vocab_size, prompt_len))

    def go(n):
        t0 = time.perf_counter()
        for i, _ in zip(range(n), generate_step(prompt, m, max_tokens=n)):
            pass
        return time.perf_counter() - t0

    go(4)
    wall = go(gen_length)
    r = {
        "mode": "mlx_lm_ar",
        "gen_length": gen_length,
        "prompt_tokens": prompt_len,
        "output_tokens": gen_length,
        "processed_vs_ideal": None,
        "tokens_per_s": gen_length / wall,
        "nfe": gen_length,
        "tokens_per_forward": 1.0,
        "processed_per_output_token": (prompt_len + gen_length) / gen_length,
        "ms_per_forward": 1000 * wall / gen_length,
        "time_to_first_block_s": None,
        "wall_s": wall,
        "peak_memory_bytes": mx.get_peak_memory(),
    }
    log(f"mlx_lm_ar  prompt {prompt_len}: {r['tokens_per_s']:.2f} tok/s")
    return r


BASELINE_NEEDS = {"torch": ("torch", "PyTorch", "illada-mlx[torch]"), "ar": ("mlx_lm", "mlx-lm", "mlx-lm")}


def require_baselines(names: list[str]) -> None:
    """Each baseline's package importable, or a one-line refusal (before any work) naming what to install."""
    import importlib

    for name in names:
        module, what, pip = BASELINE_NEEDS[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise IlladaError(f"--baselines {name} needs {what}: pip install '{pip}' (or leave {name} out)")


def require_matplotlib():
    """matplotlib, or a one-line refusal naming the extra that installs it."""
    try:
        import matplotlib
    except ImportError:
        raise IlladaError("--plot needs matplotlib: pip install 'illada-mlx[plot]'")
    return matplotlib


def plot(result: dict, path: str):
    matplotlib = require_matplotlib()
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    names = [f"{r['mode']} {r.get('block_refresh') or ''}\n(p{r['prompt_tokens']}, g{r['gen_length']})" for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, title in zip(
        axes,
        ("tokens_per_s", "tokens_per_forward", "processed_per_output_token"),
        ("tokens / s (to EOS)", "tokens per forward", "processed tokens per output token"),
    ):
        ax.bar(range(len(runs)), [r[key] or 0 for r in runs], color="#4c72b0")
        ax.set_xticks(range(len(runs)), names, rotation=60, fontsize=7)
        ax.set_title(title)
        if key == "processed_per_output_token":
            ax.set_yscale("log")
    fig.suptitle(f"illada-mlx bench: {result['model']}, gen {result['gen_lengths']} ({result['machine']['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
