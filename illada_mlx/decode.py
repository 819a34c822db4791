"""The step-parallel sampler: one loop for every mode.

    canvas = prompt + masks (fixed, official `generate`) or prompt + one block at a time (variable,
    iLLaDA's `var_generate`); for each block, for each step:
        forward (cache-aware, LM head only on the block's masked positions)
        -> candidates + confidences (kernels.py) -> commit rule (rules.py) -> write into the canvas
    at each block end: one host sync for the stop checks, a Block event; finished rows leave the batch.

Modes are options of this loop: `rule` (schedule = the official top-k, threshold, factor, entropy),
`cache` (none / prefix / dual with `refresh_every`), `logits_at` (block / masked).

Random numbers (reproducible for a seed): the key is split once per step, `key, sub = split(key)`, and
`sub` splits into (remasking key, Gumbel key); the remasking uniforms cover the block's positions in
order (B, block), the Gumbel uniforms the positions whose logits are computed (B, K, V).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from .cache import CACHE_MODES, BlockCache, refresh_due, window
from .config import THINK_END_TEXT, ContextError, IlladaError
from .kernels import candidates
from .rules import RULES, commit_entropy, commit_factor, commit_threshold, commit_topk, transfer_counts


@dataclass
class Options:
    steps: int  # steps per block (an upper bound for the adaptive rules)
    block_length: int
    mask_id: int
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: str = "low_confidence"
    rule: str = "schedule"
    threshold: float = 0.9
    factor: float = 1.0
    entropy_gamma: float = 0.1
    cache: str = "none"
    refresh_every: int = 0
    logits_at: str = "masked"
    logits_eos_inf: bool = False
    confidence_eos_eot_inf: bool = False
    eos_id: Optional[int] = None
    eot_id: Optional[int] = None
    pad_id: Optional[int] = None
    think_token: Optional[int] = None
    think_boost: Optional[tuple[float, float]] = None  # (scale, power): iLLaDA-Instruct uses (100, 3)
    seed: Optional[int] = None


@dataclass
class Stats:
    nfe: int = 0  # model forwards
    committed: int = 0  # tokens written into the canvas (past a stop too)
    output_tokens: int = 0  # generated tokens up to the first stop, all rows
    processed: int = 0  # query tokens run through the model (rows × window), CFG rows included
    wall_s: float = 0.0
    peak_memory_bytes: int = 0
    blocks: int = 0

    @property
    def tokens_per_forward(self) -> float:
        return self.output_tokens / max(self.nfe, 1)

    @property
    def committed_per_forward(self) -> float:
        return self.committed / max(self.nfe, 1)

    @property
    def processed_per_output_token(self) -> float:
        return self.processed / max(self.output_tokens, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / max(self.wall_s, 1e-9)

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d.update(tokens_per_forward=self.tokens_per_forward, committed_per_forward=self.committed_per_forward,
                 tokens_per_s=self.tokens_per_s,
                 processed_per_output_token=self.processed_per_output_token)
        return d


@dataclass
class Step:
    """One denoising step: the canvas after it and which positions (`positions`, B×K) it committed."""
    block: int
    step: int
    canvas: mx.array
    positions: mx.array
    committed: mx.array
    rows: list[int]


@dataclass
class Block:
    """A finished block: per active row, its new tokens (cut at a stop) and whether the row is done."""
    index: int
    rows: list[int]
    tokens: list[list[int]]
    finished: list[bool]


@dataclass
class Generation:
    tokens: list[list[int]]  # per prompt: generated tokens, cut before the first EOS/EoT
    finish_reasons: list[str]  # "stop" or "length"
    stats: Stats
    canvas: Optional[mx.array] = None  # fixed-canvas mode: the whole canvas, like the official generate
    texts: Optional[list[str]] = None  # with a tokenizer: decoded text, cut at the first stop string


# ------------------------------------------------------------------------------------------ checks
def validate(model, prompt_len: int, canvas_len: int, opts: Options, gen_length: Optional[int] = None):
    """Every invalid argument is refused before any work."""
    a = model.args
    if opts.mask_id is None:
        raise IlladaError("no mask token id: pass mask_id (iLLaDA: 5, LLaDA: 126336) or load the model with its tokenizer")
    if not 0 <= opts.mask_id < a.vocab_size:
        raise IlladaError(f"mask_id {opts.mask_id} is outside the vocabulary (size {a.vocab_size}); iLLaDA uses 5")
    if opts.block_length < 1 or opts.steps < 1:
        raise IlladaError("block_length and steps must be positive")
    if gen_length is not None and gen_length % opts.block_length:
        raise IlladaError(f"gen_length {gen_length} is not a multiple of block_length {opts.block_length}")
    if canvas_len > a.max_position_embeddings:
        raise ContextError(f"prompt ({prompt_len}) + generation ({canvas_len - prompt_len}) = {canvas_len} tokens is more "
                          f"than the model's {a.max_position_embeddings} positions; shorten the prompt or max tokens")
    if opts.remasking not in ("low_confidence", "random"):
        raise IlladaError(f"remasking {opts.remasking!r}: use 'low_confidence' or 'random'")
    if opts.rule not in RULES:
        raise IlladaError(f"commit rule {opts.rule!r}: use one of {', '.join(RULES)}")
    if opts.cache not in CACHE_MODES:
        raise IlladaError(f"cache {opts.cache!r}: use one of {', '.join(CACHE_MODES)}")
    if opts.logits_at not in ("block", "masked"):
        raise IlladaError(f"logits_at {opts.logits_at!r}: use 'block' or 'masked'")
    if opts.temperature < 0 or opts.cfg_scale < 0:
        raise IlladaError("temperature and cfg_scale must be ≥ 0")
    if not 0 < opts.threshold <= 1:
        raise IlladaError(f"threshold {opts.threshold} must be in (0, 1]")
    if opts.remasking == "random" and opts.rule != "schedule":
        raise IlladaError("random remasking has no confidence to threshold: use rule='schedule'")


def left_pad(prompts, pad_id: int):
    """Rows of token ids -> (ids (B, P) int32, key_valid (B, P) or None when no row is padded)."""
    if isinstance(prompts, mx.array):
        prompts = np.array(prompts).tolist()
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise IlladaError("empty prompt: give at least one token per row")
    P = max(len(p) for p in prompts)
    ids = np.array([[pad_id] * (P - len(p)) + p for p in prompts], dtype=np.int32)
    valid = np.array([[0] * (P - len(p)) + [1] * len(p) for p in prompts], dtype=np.int32)
    return mx.array(ids), (None if valid.all() else mx.array(valid))


# ------------------------------------------------------------------------------------------ one step
def _forward(model, x, key_valid, prompt_mask, pos, lo, hi, cache, refresh, opts, stats):
    """Logits (B, K, V) at canvas positions `pos` (B, K), with CFG and the block cache."""
    B, L = x.shape
    xin, kv, at = x, key_valid, pos
    if opts.cfg_scale > 0:
        xin = mx.concatenate([x, mx.where(prompt_mask, opts.mask_id, x)])
        kv = None if kv is None else mx.concatenate([kv, kv])
        at = mx.concatenate([pos, pos])
    if cache is None or refresh:
        n = 0
        if cache is not None:
            cache.refreshing, n, cache.reuse = True, cache.reuse, 0
            cache.tokens = x
        logits = model(xin[:, n:], kv, logits_at=at - n, cache=cache, offset=n)
        if cache is not None:
            cache.refreshing = False
        stats.processed += xin.shape[0] * (L - n)
    else:
        wlo, whi = window(opts.cache, lo, hi, L)
        logits = model(xin[:, wlo:whi], kv, logits_at=at - wlo, cache=cache, offset=wlo)
        stats.processed += xin.shape[0] * (whi - wlo)
    stats.nfe += 1
    if opts.cfg_scale > 0:
        cond, un = logits[:B], logits[B:]
        logits = un + (opts.cfg_scale + 1) * (cond - un)
    return logits


def _commit(conf, ent, k, opts):
    if opts.rule == "schedule":
        return commit_topk(conf, mx.full((conf.shape[0],), k, dtype=mx.int32))
    if opts.rule == "threshold":
        return commit_threshold(conf, opts.threshold)
    if opts.rule == "factor":
        return commit_factor(conf, opts.factor)
    return commit_entropy(conf, ent, opts.entropy_gamma)


def _denoise_block(model, x, key_valid, prompt_mask, P, lo, hi, cache, opts, key, boost, stats, index, rows):
    """Fill the masks of canvas[:, lo:hi]. Yields Step events; returns (x, key)."""
    size = hi - lo
    steps = min(opts.steps, size)
    counts = transfer_counts(size, steps) if opts.rule == "schedule" else None
    remaining, t = size, 0  # a block starts all masks; `remaining` is the most any row has left
    block_pos = mx.arange(lo, hi, dtype=mx.int32)
    banned = mx.array([opts.mask_id] + ([opts.eos_id] if opts.logits_eos_inf and opts.eos_id is not None else []))
    while remaining > 0 and t < (steps if counts else size):
        key, sub = mx.random.split(key)
        k_remask, k_gumbel = mx.random.split(sub)
        B = x.shape[0]
        if opts.logits_at == "masked":  # masked positions first, in canvas order; K = what is left
            blk = x[:, lo:hi]
            order = mx.argsort(mx.where(blk == opts.mask_id, block_pos, block_pos + size), axis=-1)
            pos = (order[:, :remaining] + lo).astype(mx.int32)
        else:
            pos = mx.broadcast_to(block_pos, (B, size))
        logits = _forward(model, x, key_valid, prompt_mask, pos, lo, hi, cache,
                          refresh_due(opts.cache, t, opts.refresh_every), opts, stats)
        cur = mx.take_along_axis(x, pos, axis=1)
        is_mask = cur == opts.mask_id
        logits[..., banned] = -mx.inf  # the mask token (a committed mask would stay masked), EOS if asked
        if boost and opts.think_token is not None:  # end-of-thinking boost at the leftmost masked position
            thought = mx.any(x[:, P:] == opts.think_token, axis=1)
            first = mx.argmax(mx.where(is_mask, -pos, -(2 ** 30)), axis=1)
            logits = logits.at[mx.arange(B), first, opts.think_token].add(mx.where(thought, 0.0, boost))
        x0, p, ent = candidates(logits, opts.temperature, k_gumbel, opts.rule == "entropy")
        if opts.remasking == "random":
            u = mx.random.uniform(shape=(B, size), key=k_remask)
            conf = mx.take_along_axis(u, pos - lo, axis=1)
        else:
            conf = p
        if opts.confidence_eos_eot_inf:
            for tok in (opts.eos_id, opts.eot_id):
                if tok is not None:
                    conf = mx.where(x0 == tok, -mx.inf, conf)
        conf = mx.where(is_mask, conf, -mx.inf)
        transfer = _commit(conf, ent, counts[t] if counts else None, opts)
        x = mx.put_along_axis(x, pos, mx.where(transfer, x0, cur), axis=1)
        if counts:
            remaining -= counts[t]
            mx.async_eval(x)
        else:  # the adaptive rules need the count left: the step's one sync
            remaining = int(mx.max((is_mask & ~transfer).sum(axis=1)))
        yield Step(index, t, x, pos, transfer, rows)
        t += 1
    stats.committed += size * x.shape[0]  # a block always ends fully committed
    return x, key


def _first_stop(tokens: list[int], stop_ids: set) -> Optional[int]:
    return next((i for i, t in enumerate(tokens) if t in stop_ids), None)


# ------------------------------------------------------------------------------------------ the loop
def decode(model, prompts, opts: Options, gen_length: int, variable: bool = False,
           stop_fn: Optional[Callable[[list[int]], bool]] = None,
           cache: Optional[BlockCache] = None) -> Iterator[Union[Step, Block, Generation]]:
    """Yields Step and Block events, then the final Generation.

    Fixed canvas (variable=False): prompt + gen_length masks, every block run (the official algorithm).
    Variable (variable=True): gen_length is a budget; the canvas grows a block at a time and each row
    stops after the block where EOS/EoT appears or `stop_fn(tokens so far)` says so.
    cache: a BlockCache kept from an earlier call (chat turns): its common prefix with this prompt is
    reused by the first refresh (only with opts.cache on, batch 1).
    """
    t0 = time.perf_counter()
    mx.reset_peak_memory()
    stats = Stats()
    pad = opts.pad_id if opts.pad_id is not None else (opts.eos_id if opts.eos_id is not None else 0)
    x, key_valid = left_pad(prompts, pad)
    n_rows, P = x.shape
    canvas_len = P + gen_length  # the most it grows to (the last variable block is cut at the budget)
    validate(model, P, canvas_len, opts, None if variable else gen_length)
    prompt_mask = mx.concatenate([x != opts.mask_id, mx.zeros((n_rows, canvas_len - P), dtype=mx.bool_)], axis=1)
    if not variable:
        x = mx.concatenate([x, mx.full((n_rows, gen_length), opts.mask_id, dtype=mx.int32)], axis=1)
    if key_valid is not None:
        key_valid = mx.concatenate([key_valid, mx.ones((n_rows, canvas_len - P), dtype=mx.int32)], axis=1)
    key = mx.random.key(opts.seed if opts.seed is not None else int(time.time_ns() % 2**31))
    if opts.cache == "none":
        cache = None
    elif cache is None:
        cache = BlockCache()
    else:
        cache.plan_reuse(x, P - 1 if opts.cfg_scale == 0 else 0)  # the prompt's last token is always recomputed
    stop_ids = {t for t in (opts.eos_id, opts.eot_id) if t is not None}
    rows = list(range(n_rows))  # original indices of the active rows
    out: list[list[int]] = [[] for _ in range(n_rows)]
    done = [False] * n_rows
    n_blocks = math.ceil(gen_length / opts.block_length)
    for b in range(n_blocks):
        lo = P + b * opts.block_length
        hi = min(lo + opts.block_length, P + gen_length)
        if variable:
            x = mx.concatenate([x, mx.full((len(rows), hi - lo), opts.mask_id, dtype=mx.int32)], axis=1)
        kv = None if key_valid is None else key_valid[:, :hi if variable else canvas_len]
        pm = prompt_mask[:, : x.shape[1]]
        boost = 0.0
        if opts.think_boost:
            scale, power = opts.think_boost
            boost = scale * min(max((lo - P) / gen_length, 0.0), 1.0) ** power
        x, key = yield from _denoise_block(model, x, kv, pm, P, lo, hi, cache, opts, key, boost, stats, b, rows)
        # block end: the one host sync for stop checks
        new = np.array(x[:, lo:hi]).tolist()
        finished, block_tokens = [], []
        for j, r in enumerate(rows):
            toks = []
            if not done[r]:
                cut = _first_stop(new[j], stop_ids)
                toks = new[j] if cut is None else new[j][:cut]
                out[r].extend(toks)
                done[r] = cut is not None or (stop_fn is not None and stop_fn(out[r]))
            finished.append(done[r])
            block_tokens.append(toks)
        stats.blocks += 1
        yield Block(b, list(rows), block_tokens, finished)
        if variable and any(finished):
            keep = [j for j, f in enumerate(finished) if not f]
            if not keep:
                break
            idx = mx.array(keep)
            x, prompt_mask = x[idx], prompt_mask[idx]
            key_valid = None if key_valid is None else key_valid[idx]
            rows = [rows[j] for j in keep]
            if cache is not None:
                cache.keys, cache.values, cache.tokens = {}, {}, None
    mx.eval(x)
    stats.output_tokens = sum(len(o) for o in out)
    stats.wall_s = time.perf_counter() - t0
    stats.peak_memory_bytes = mx.get_peak_memory()
    reasons = ["stop" if d else "length" for d in done]
    yield Generation(out, reasons, stats, canvas=None if variable else x)


def run(events: Iterator, on_event: Optional[Callable] = None) -> Generation:
    """Drain a decode() iterator (calling on_event for each Step/Block) and return the Generation."""
    for ev in events:
        if isinstance(ev, Generation):
            return ev
        if on_event is not None:
            on_event(ev)
    raise RuntimeError("decode ended without a result")


# ------------------------------------------------------------------------------------------ public API
def _options(model, mask_id, **kw) -> Options:
    a = model.args
    mask_id = a.mask_token_id if mask_id is None else mask_id
    kw.setdefault("eos_id", a.eos_token_id)
    kw.setdefault("eot_id", a.eot_token_id)
    kw.setdefault("pad_id", a.pad_token_id)
    return Options(mask_id=mask_id, **kw)


def generate(model, prompt, steps: int = 128, gen_length: int = 128, block_length: int = 128,
             temperature: float = 0.0, cfg_scale: float = 0.0, remasking: str = "low_confidence",
             mask_id: Optional[int] = None, attention_mask=None, logits_eos_inf: bool = False,
             confidence_eos_eot_inf: bool = False, return_stats: bool = False, on_event=None, **fast):
    """The official fixed-canvas `generate`, same parameter names; returns the canvas (B, P + G).

    `prompt` is (B, P) ids (left-padded rows with `attention_mask`, or a list of unequal rows, padded here).
    Fast-mode switches in `fast`: rule, threshold, factor, entropy_gamma, cache, refresh_every, logits_at,
    seed, eos_id, eot_id. With return_stats=True returns (canvas, Stats).
    """
    if gen_length % block_length:
        raise IlladaError(f"gen_length {gen_length} is not a multiple of block_length {block_length}")
    n_blocks = gen_length // block_length
    if steps % n_blocks:
        raise IlladaError(f"steps {steps} is not divisible by the number of blocks {n_blocks} (gen_length/block_length)")
    if attention_mask is not None:
        am = np.array(attention_mask)
        prompt = [[int(t) for t, v in zip(row, m) if v] for row, m in zip(np.array(prompt), am)]
    opts = _options(model, mask_id, steps=steps // n_blocks, block_length=block_length, temperature=temperature,
                    cfg_scale=cfg_scale, remasking=remasking, logits_eos_inf=logits_eos_inf,
                    confidence_eos_eot_inf=confidence_eos_eot_inf, **fast)
    g = run(decode(model, prompt, opts, gen_length), on_event)
    return (g.canvas, g.stats) if return_stats else g.canvas


def var_generate(model, prompt, steps: int = 32, max_tokens: int = 1024, block_length: int = 32,
                 temperature: float = 0.0, mask_id: Optional[int] = None, stop: Sequence[str] = (),
                 tokenizer=None, think_boost: Optional[tuple[float, float]] = None, on_event=None,
                 **kw) -> Generation:
    """iLLaDA's variable-length generation, batched: grow the canvas a block at a time (`steps` steps per
    block), stop a row after the block where EOS/EoT or a stop string appears, cut at the first stop.
    `max_tokens` is the budget. `think_boost=(100, 3)` is iLLaDA-Instruct's end-of-thinking boost."""
    stop_fn = stop_checker(tokenizer, stop)
    think = think_token_id(tokenizer) if think_boost else None
    opts = _options(model, mask_id, steps=steps, block_length=block_length, temperature=temperature,
                    think_token=kw.pop("think_token", think), think_boost=think_boost, **kw)
    g = run(decode(model, prompt, opts, max_tokens, variable=True, stop_fn=stop_fn), on_event)
    if tokenizer is not None:
        g.texts = [cut_at_stop(tokenizer.decode(t), stop) for t in g.tokens]
    return g


def think_token_id(tokenizer) -> Optional[int]:
    """The token the end-of-thinking boost pushes: the first token of `</think>`."""
    ids = tokenizer.encode(THINK_END_TEXT, add_special_tokens=False) if tokenizer is not None else []
    return ids[0] if ids else None


def stop_checker(tokenizer, stop: Sequence[str]) -> Optional[Callable[[list[int]], bool]]:
    """stop_fn for decode(): has any stop string appeared in the decoded tokens so far?"""
    stop = [s for s in stop if s]
    if not stop:
        return None
    if tokenizer is None:
        raise IlladaError("stop strings need the tokenizer: pass tokenizer=")
    return lambda toks: any(s in tokenizer.decode(toks) for s in stop)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text
