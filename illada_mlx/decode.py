"""The step-parallel sampler: one loop for every mode.

    canvas = prompt + masks (fixed, official `generate`) or prompt + one block at a time (growing, iLLaDA's
    `var_generate`); for each block, for each step:
        forward (cache-aware, LM head only on the block's masked positions)
        -> candidates + confidences (kernels.py) -> commit rule (rules.py) -> write into the canvas
    at each block end: one host sync for the stop checks, a BlockDone event; finished rows leave the batch.

What to run is a `DecodeSpec` (spec.py): the commit rule, the cache and its refresh policy, where logits
are computed, and so on are its fields, which the loop composes.

Random numbers (reproducible for a seed): the key is split once per step, `key, sub = split(key)`, and
`sub` splits into (remasking key, Gumbel key); the remasking uniforms cover the block's positions in
order (B, block), the Gumbel uniforms the positions whose logits are computed (B, K, V).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from .cache import BlockCache, refresh_kind, step_window
from .config import IlladaError
from .kernels import candidates, filter_logits
from .rules import (
    commit_entropy,
    commit_error,
    commit_factor,
    commit_stable,
    commit_threshold,
    commit_topk,
    transfer_counts,
)
from .spec import DecodeSpec, think_token_id
from .text import ReplyText


@dataclass
class Stats:
    nfe: int = 0  # model forwards
    committed: int = 0  # tokens written into the canvas (past a stop too)
    output_tokens: int = 0  # generated tokens up to the first stop, all rows
    prompt_tokens: int = 0  # prompt tokens, all rows (left padding excluded)
    processed: int = 0  # query tokens run through the model (rows × window), CFG rows included
    prompt_s: float = 0.0  # time to the end of the first forward, which reads the whole prompt
    wall_s: float = 0.0
    peak_memory_bytes: int = 0
    blocks: int = 0
    drift_refreshes: int = 0  # whole-canvas refreshes the drift policy ran (cache.py)
    max_drift: float = 0.0  # the largest probe drift it measured

    def add_forwards(self, forwards: int, processed: int) -> None:
        """Count `forwards` forwards run outside the sampler over `processed` query tokens (a template's choice
        scoring, a tool decision)."""
        self.nfe += forwards
        self.processed += processed

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

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / max(self.prompt_s, 1e-9)

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d.update(
            tokens_per_forward=self.tokens_per_forward,
            committed_per_forward=self.committed_per_forward,
            tokens_per_s=self.tokens_per_s,
            prompt_tps=self.prompt_tps,
            processed_per_output_token=self.processed_per_output_token,
        )
        return d


@dataclass
class Step:
    """One denoising step: the canvas after it, which positions (`positions`, B×K) it committed, and the
    candidate logits there (B×K×V, after the bans and top_k / top_p / min_p)."""

    block: int
    step: int
    canvas: mx.array
    positions: mx.array
    committed: mx.array
    rows: list[int]
    logits: Optional[mx.array] = None


@dataclass
class BlockDone:
    """A finished block: per active row, its new tokens (cut at a stop) and whether the row is done."""

    index: int
    rows: list[int]
    tokens: list[list[int]]
    finished: list[bool]
    stats: "Stats"  # the call's running figures


@dataclass
class Generation:
    tokens: list[list[int]]  # per prompt: generated tokens, cut before the first EOS/EoT
    finish_reasons: list[str]  # "stop" or "length"
    stats: Stats
    canvas: Optional[mx.array] = None  # fixed-canvas mode: the whole canvas, like the official generate
    texts: Optional[list[str]] = None  # with a tokenizer: decoded text, cut at the first stop string


@dataclass
class Infill:
    """A fixed canvas whose answer starts partly written and whose open positions are constrained
    (structured.py's templates): `answer` (rows, max_tokens) holds the written tokens and mask_id where the
    model writes; `allowed(canvas, positions)` gives the tokens each of `positions` (B, K) may take now,
    (B, K, V) bool."""

    answer: mx.array
    allowed: Callable[[mx.array, mx.array], mx.array]


@dataclass
class DecodeState:
    """One call's state: the canvas of the rows still running and what goes with it."""

    x: mx.array  # (active rows, canvas so far)
    key_valid: Optional[mx.array]  # (active rows, full canvas): 0 at left padding; None when no row is padded
    prompt_mask: mx.array  # (active rows, full canvas): prompt tokens that are not masks (CFG's unconditional copy)
    prompt_len: int
    rows: list[int]  # original index of each active row
    kv: Optional[BlockCache]  # the block cache (spec.cache is its policy)
    key: mx.array  # split once per step
    stats: Stats
    t0: float
    # the drift policy, per active row: the reply tokens before the block whose start last recomputed its
    # canvas (0: never; rows appended later are padded with 0)
    refreshed: list[int] = field(default_factory=list)
    infill: Optional[Infill] = None

    def keep(self, idx: list[int], cfg: bool) -> None:
        """Drop every active row not in idx (positions in the active batch); the cache keeps its rows
        (with CFG the unconditional copies too, which follow the conditional rows)."""
        n = self.x.shape[0]
        i = mx.array(idx)
        self.x, self.prompt_mask = self.x[i], self.prompt_mask[i]
        self.key_valid = None if self.key_valid is None else self.key_valid[i]
        self.rows = [self.rows[j] for j in idx]
        self.refreshed = [self.refreshed[j] for j in idx if j < len(self.refreshed)]
        if self.kv is not None:
            self.kv.keep(mx.array(idx + [j + n for j in idx]) if cfg else i)


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
def forward_logits(model, st: DecodeState, spec: DecodeSpec, pos, lo: int, hi: int, kind: Optional[str], query=None):
    """Logits (B, K, V) at canvas positions `pos` (B, K), with CFG and the block cache. kind: what the
    forward recomputes (cache.refresh_kind): "full", "window", "drift" or None (a step). query: the token
    cache's step, the positions (B, Q) to run; its first K are `pos` wherever `pos` is a mask (the logits at
    the other entries are a repeat's)."""
    x, kv = st.x, st.kv
    B, L = x.shape
    if kv is not None:
        kv.window(L)  # a forward attends over the canvas
    if query is not None:
        return _run_positions(model, st, spec, query, mx.arange(pos.shape[1]))
    if kind == "drift":
        return _probed_refresh(model, st, spec, pos, lo, hi)
    xin, key_mask = _cfg_inputs(st, spec)
    at = mx.concatenate([pos, pos]) if spec.cfg_scale > 0 else pos
    end = step_window(spec.cache, lo, hi, L)[1]
    if kv is None:
        wlo, end = 0, L
    elif kind == "full":
        wlo, end = kv.take_reuse(), L
    elif kind == "window":  # the finished block once more, with its final tokens, and the new one
        wlo = lo - spec.block_length
    else:
        wlo = lo
    logits = model(xin[:, wlo:end], key_mask, logits_at=at - wlo, cache=kv, offset=wlo)
    if kv is not None:
        kv.record(xin[:, wlo:end], wlo)
        if kind is not None:  # a block-start refresh: everything before the block now has its final tokens
            kv.settle(lo)
    return _tally(st, spec, logits, B, xin.shape[0] * (end - wlo))


def _cfg_inputs(st: DecodeState, spec: DecodeSpec):
    """The canvas and key mask a forward runs: with CFG, each row followed by its unconditional copy (the
    prompt's tokens masked)."""
    x, L = st.x, st.x.shape[1]
    kv = None if st.key_valid is None else st.key_valid[:, :L]
    if spec.cfg_scale <= 0:
        return x, kv
    x = mx.concatenate([x, mx.where(st.prompt_mask[:, :L], spec.mask_id, x)])
    return x, None if kv is None else mx.concatenate([kv, kv])


def _run_positions(model, st: DecodeState, spec: DecodeSpec, query, logits_at):
    """Logits at `logits_at` (entries of `query`) from a forward of the canvas positions `query` (B, Q),
    whose keys/values are written over the cache's, with CFG."""
    B = st.x.shape[0]
    x, key_mask = _cfg_inputs(st, spec)
    if spec.cfg_scale > 0:
        query = mx.concatenate([query, query])
        logits_at = logits_at if logits_at.ndim == 1 else mx.concatenate([logits_at, logits_at])
    ids = mx.take_along_axis(x, query, axis=1)
    logits = model(ids, key_mask, logits_at=logits_at, cache=st.kv, offset=query)
    st.kv.record_at(ids, query)
    return _tally(st, spec, logits, B, x.shape[0] * query.shape[1])


def probe_positions(key_valid: Optional[mx.array], rows: int, end: int, n: int) -> Optional[mx.array]:
    """(rows, n) canvas positions spread evenly over each row's tokens before `end` (left padding
    excluded): the i-th (1..n) at start + ⌈i · span / n⌉ − 1, so the last is end − 1 (repeats when the
    span is shorter than n); None when there are none."""
    start = mx.zeros((rows,), dtype=mx.int32) if key_valid is None else (key_valid[:, :end] == 0).sum(1)
    if n < 1 or end < 1 or int(start.max()) >= end:
        return None
    span = end - start
    i = mx.arange(1, n + 1, dtype=mx.int32)
    return (start[:, None] + (i[None] * span[:, None] + n - 1) // n - 1).astype(mx.int32)


def may_refresh(st: DecodeState, lo: int) -> list[int]:
    """The active rows the drift policy may recompute at the block starting at `lo`: at most once each
    time the reply doubles, per row (blocks 1, 2, 4, 8, ... of it), so the work stays linear in the reply."""
    st.refreshed += [0] * (st.x.shape[0] - len(st.refreshed))
    written = lo - st.prompt_len
    return [j for j, r in enumerate(st.refreshed) if written > 0 and written >= 2 * r]


def _probed_refresh(model, st: DecodeState, spec: DecodeSpec, pos, lo: int, hi: int):
    """The drift policy's block start: the window (the finished block once more, and the new one) runs with
    probes spread over the positions before it, whose cached keys were computed while the rest of the reply
    was masks or absent. The rows whose probes moved more than spec.drift_threshold (cache.drift) have
    their whole canvas recomputed (a second forward, for those rows alone: a row decodes as it does alone),
    and those logits are theirs. Only the rows that may refresh (`may_refresh`) probe: the others' probes
    repeat the window's first position (a repeat writes what the window writes), so each row decodes as
    it does alone, and a block start where no row may refresh runs the plain window."""
    kv, B = st.kv, st.x.shape[0]
    wlo = lo - spec.block_length
    end = step_window(spec.cache, lo, hi, st.x.shape[1])[1]
    eligible = may_refresh(st, lo)
    probes = probe_positions(st.key_valid, B, wlo, spec.drift_probes) if eligible else None
    if probes is None:
        return forward_logits(model, st, spec, pos, lo, hi, "window")
    if len(eligible) < B:
        probing = mx.zeros((B, 1), dtype=mx.bool_)
        probing[mx.array(eligible)] = True
        probes = mx.where(probing, probes, wlo)
    n = probes.shape[1]
    query = mx.concatenate([probes, mx.broadcast_to(mx.arange(wlo, end, dtype=mx.int32), (B, end - wlo))], axis=1)
    kv.probe(n)
    logits = _run_positions(model, st, spec, query, pos - wlo + n)
    drift = kv.drift(getattr(model, "group", None))
    if spec.cfg_scale > 0:  # a row and its unconditional copy refresh together
        drift = mx.maximum(drift[:B], drift[B:])
    drift = drift.tolist()
    st.stats.max_drift = max([st.stats.max_drift] + [drift[j] for j in eligible])
    kv.settle(lo)
    moved = [j for j in eligible if drift[j] > spec.drift_threshold]
    if not moved:
        return logits
    for j in moved:
        st.refreshed[j] = lo - st.prompt_len
    st.stats.drift_refreshes += len(moved)
    if len(moved) == B:
        return forward_logits(model, st, spec, pos, lo, hi, "full")
    idx = mx.array(moved)
    part = DecodeState(
        st.x[idx],
        None if st.key_valid is None else st.key_valid[idx],
        st.prompt_mask[idx],
        st.prompt_len,
        [st.rows[j] for j in moved],
        None,
        st.key,
        st.stats,
        st.t0,
    )
    rows = mx.array(moved + [j + B for j in moved]) if spec.cfg_scale > 0 else idx
    part.kv = kv.rows(rows)
    logits[idx] = forward_logits(model, part, spec, pos[idx], lo, hi, "full")
    kv.put_rows(rows, part.kv)
    return logits


def _tally(st: DecodeState, spec: DecodeSpec, logits, B: int, processed: int):
    """Count the forward; with CFG, combine the conditional and unconditional logits."""
    st.stats.processed += processed
    st.stats.nfe += 1
    if spec.cfg_scale > 0:
        cond, un = logits[:B], logits[B:]
        logits = un + (spec.cfg_scale + 1) * (cond - un)
    return logits


def _token_query(x, prev, prev_mask, mask_id: int):
    """The token cache's step: (the positions to run, the previous step's positions reordered). Each row
    runs what it had masked at the previous step: its masks now, in canvas order, then the tokens that step
    committed; a row with fewer repeats its first position (a repeat writes the same keys/values), so each
    row runs what it would run alone. The reordered positions are distinct: the logits' positions."""
    n = prev.shape[1]
    rank = mx.arange(n)
    masked = mx.take_along_axis(x, prev, axis=1) == mask_id
    order = mx.argsort(mx.where(masked, rank, mx.where(prev_mask, rank + n, rank + 2 * n)), axis=-1)
    ordered = mx.take_along_axis(prev, order, axis=1)
    return mx.where(mx.take_along_axis(prev_mask, order, axis=1), ordered, ordered[:, :1]), ordered


def _commit(conf, ent, k, spec: DecodeSpec):
    if spec.rule == "schedule":
        return commit_topk(conf, mx.full((conf.shape[0],), k, dtype=mx.int32))
    if spec.rule == "threshold":
        return commit_threshold(conf, spec.threshold)
    if spec.rule == "factor":
        return commit_factor(conf, spec.factor)
    if spec.rule == "error":
        return commit_error(conf, spec.error_bound)
    return commit_entropy(conf, ent, spec.entropy_gamma)


def fill_after_eos(x0, transfer, is_mask, pos, block: mx.array, lo: int, spec: DecodeSpec):
    """The candidates and commits with every masked position after the row's first EOS/EoT (in the block
    before this step, `block`, or committed by it) committed as EOS too: the reply ends there, and what
    follows is the EOS padding the model writes after an answer, decoded at once rather than a position
    or a few per step."""
    ends = [t for t in (spec.eos_id, spec.eot_id) if t is not None]
    if not ends:
        return x0, transfer
    never = 2**30
    held = mx.any(mx.stack([block == e for e in ends]), axis=0)
    now = transfer & mx.any(mx.stack([x0 == e for e in ends]), axis=0)
    first = mx.minimum(
        mx.min(mx.where(held, mx.arange(block.shape[1]) + lo, never), axis=1), mx.min(mx.where(now, pos, never), axis=1)
    )
    fill = is_mask & ~transfer & (pos > first[:, None])
    return mx.where(fill, ends[0], x0), transfer | fill


@dataclass
class _Block:
    """One block's denoising: where it is, its schedule, and the step loop's state."""

    index: int
    lo: int
    hi: int
    boost: float
    counts: Optional[list]  # the schedule's commits per step (None: an adaptive rule)
    steps: int
    positions: mx.array  # the block's canvas positions
    banned: mx.array  # the tokens no position may take
    remaining: int  # the most masks any row has left
    t: int = 0
    prev: Optional[mx.array] = None  # the positions the previous step computed logits at
    prev_mask: Optional[mx.array] = None  # which of them were masks
    seen: Optional[mx.array] = None  # (B, size): each masked position's candidate at the previous step, else -1

    @property
    def size(self) -> int:
        return self.hi - self.lo

    def saw(self, pos, x0, conf) -> mx.array:
        """This step's candidates at the masked `pos` (conf > -inf) recorded for the next step; returns what
        the previous step predicted at `pos` (−1 where it had nothing)."""
        rel = pos - self.lo
        seen = self.seen if self.seen is not None else mx.full((pos.shape[0], self.size), -1, dtype=mx.int32)
        self.seen = mx.put_along_axis(seen, rel, mx.where(conf > -mx.inf, x0, -1).astype(mx.int32), axis=1)
        return mx.take_along_axis(seen, rel, axis=1)


def _new_block(spec: DecodeSpec, index: int, lo: int, hi: int, boost: float, masks: int) -> _Block:
    """A block of canvas[lo:hi] holding `masks` masks (its size, but where an infill wrote some): the
    schedule spreads its commits over those, as the official get_num_transfer_tokens counts them."""
    steps = min(spec.steps_per_block, masks)
    counts = transfer_counts(masks, steps) if spec.rule == "schedule" and masks else None
    banned = mx.array([spec.mask_id] + ([spec.eos_id] if spec.logits_eos_inf and spec.eos_id is not None else []))
    return _Block(index, lo, hi, boost, counts, steps, mx.arange(lo, hi, dtype=mx.int32), banned, masks)


def denoise_block(
    model, st: DecodeState, spec: DecodeSpec, index: int, lo: int, hi: int, boost: float, forward=None
) -> Iterator[Step]:
    """Fill the masks of canvas[:, lo:hi] in st.x (block `index`; `boost`: the think boost there). Yields
    Step events; while it holds one, the consumer may drop rows (st.keep) and the block goes on with the
    others, as it would have without them. forward: what computes the logits, with `forward_logits`'s
    arguments (default `forward_logits`). decode() and the batcher (batch.py) both run their blocks here."""
    forward = forward or forward_logits
    # a block starts all masks, but for an infill's written tokens (counted: one sync a block)
    masks = hi - lo if st.infill is None else int(mx.max((st.x[:, lo:hi] == spec.mask_id).sum(axis=1)))
    blk = _new_block(spec, index, lo, hi, boost, masks)
    while blk.remaining > 0 and blk.t < (blk.steps if blk.counts else blk.size):
        st.key, sub = mx.random.split(st.key)
        keys = mx.random.split(sub)  # (remasking key, Gumbel key)
        x = st.x
        kind = refresh_kind(spec.cache, spec.block_refresh, index, blk.t, spec.refresh_every, spec.full_refresh_every)
        pos, query = _step_positions(st, spec, blk, kind)
        logits = forward(model, st, spec, pos, lo, hi, kind, query)
        cur = mx.take_along_axis(x, pos, axis=1)
        is_mask = cur == spec.mask_id
        blk.prev, blk.prev_mask = pos, is_mask
        logits, x0, transfer = _choose(st, spec, blk, logits, pos, is_mask, keys)
        st.x = mx.put_along_axis(x, pos, mx.where(transfer, x0, cur), axis=1)
        _count(st, blk, is_mask, transfer)
        before = st.rows
        yield Step(index, blk.t, st.x, pos, transfer, st.rows, logits)
        if len(st.rows) < len(before):  # the consumer dropped rows (DecodeState.keep): the rest go on
            _rows_left(st, before, blk, spec.mask_id)
        blk.t += 1
    st.stats.committed += blk.size * st.x.shape[0]  # a block always ends fully committed


def _step_positions(st: DecodeState, spec: DecodeSpec, blk: _Block, kind: Optional[str]):
    """(the positions (B, K) the step computes logits at, the token cache's query or None)."""
    x = st.x
    if spec.cache == "token" and kind is None:
        query, ordered = _token_query(x, blk.prev, blk.prev_mask, spec.mask_id)
        return ordered[:, : blk.remaining], query
    if spec.logits_at == "masked":  # masked positions first, in canvas order; K = what is left
        inside = x[:, blk.lo : blk.hi]
        order = mx.argsort(mx.where(inside == spec.mask_id, blk.positions, blk.positions + blk.size), axis=-1)
        return (order[:, : blk.remaining] + blk.lo).astype(mx.int32), None
    return mx.broadcast_to(blk.positions, (x.shape[0], blk.size)), None


def _choose(st: DecodeState, spec: DecodeSpec, blk: _Block, logits, pos, is_mask, keys):
    """The step's logits after the bans, the think boost and the filters; its candidates and which of them
    it commits: (logits, candidates, commit flags)."""
    k_remask, k_gumbel = keys
    x = st.x
    B = x.shape[0]
    logits[..., blk.banned] = -mx.inf  # the mask token (a committed mask would stay masked), EOS if asked
    if st.infill is not None:
        logits = mx.where(st.infill.allowed(x, pos), logits, -mx.inf)
    if blk.boost and spec.think_token is not None:  # end-of-thinking boost at the leftmost masked position
        thought = mx.any(x[:, st.prompt_len :] == spec.think_token, axis=1)
        first = mx.argmax(mx.where(is_mask, -pos, -(2**30)), axis=1)
        logits = logits.at[mx.arange(B), first, spec.think_token].add(mx.where(thought, 0.0, blk.boost))
    if spec.temperature > 0:
        logits = filter_logits(logits, spec.top_p, spec.top_k, spec.min_p)
    x0, p, ent = candidates(logits, spec.temperature, k_gumbel, spec.rule == "entropy")
    if spec.remasking == "random":
        u = mx.random.uniform(shape=(B, blk.size), key=k_remask)
        conf = mx.take_along_axis(u, pos - blk.lo, axis=1)
    else:
        conf = p
    if spec.confidence_eos_eot_inf:
        for tok in (spec.eos_id, spec.eot_id):
            if tok is not None:
                conf = mx.where(x0 == tok, -mx.inf, conf)
    conf = mx.where(is_mask, conf, -mx.inf)
    transfer = _commit(conf, ent, blk.counts[blk.t] if blk.counts else None, spec)
    if spec.stable:
        transfer = transfer | commit_stable(conf, x0, blk.saw(pos, x0, conf), spec.stable_threshold)
    if spec.eos_fill and not blk.counts:
        x0, transfer = fill_after_eos(x0, transfer, is_mask, pos, x[:, blk.lo : blk.hi], blk.lo, spec)
    return logits, x0, transfer


def _count(st: DecodeState, blk: _Block, is_mask, transfer) -> None:
    """After a step: the masks left (a schedule's count, or the step's one host sync), the prompt's time."""
    if blk.counts:
        blk.remaining -= blk.counts[blk.t]
        mx.async_eval(st.x)
    else:  # the adaptive rules need the count left: the step's one sync
        blk.remaining = int(mx.max((is_mask & ~transfer).sum(axis=1)))
    if st.stats.nfe == 1:  # the first forward read the prompt: its time is the prompt's
        mx.eval(st.x)
        st.stats.prompt_s = time.perf_counter() - st.t0


def _rows_left(st: DecodeState, before: list[int], blk: _Block, mask_id: int) -> None:
    """After rows left mid-block (st.rows, a subset of `before`): the previous step's positions and mask flags
    of the rows still there, and the most masks any of them has left in the block (what the step's count
    would have been without the others; a schedule's count is the same for every row and stays)."""
    if not st.rows:
        blk.remaining = 0
        return
    idx = mx.array([before.index(r) for r in st.rows], dtype=mx.int32)
    if not blk.counts:
        blk.remaining = int(mx.max((st.x[:, blk.lo : blk.hi] == mask_id).sum(axis=1)))
    blk.prev, blk.prev_mask = blk.prev[idx], blk.prev_mask[idx]
    blk.seen = None if blk.seen is None else blk.seen[idx]


# ------------------------------------------------------------------------------------------ the loop
StopFn = Callable[[int, list[int]], bool]


def decode(
    model,
    prompts,
    spec: DecodeSpec,
    stop_fn: Optional[StopFn] = None,
    cache: Optional[BlockCache] = None,
    infill: Optional[Infill] = None,
) -> Iterator[Union[Step, BlockDone, Generation]]:
    """Yields Step and BlockDone events, then the final Generation.

    Fixed canvas: prompt + spec.max_tokens masks, every block run (the official algorithm). Growing: the
    canvas grows a block at a time up to the budget, and each row stops after the block where EOS/EoT
    appears or `stop_fn(row, the block's new tokens)` returns True (stop strings).
    cache: a BlockCache kept from an earlier call (chat turns): its common prefix with this prompt is
    reused by the first refresh (only with spec.cache on, batch 1).
    infill: a fixed canvas's answer written in part, its open positions constrained (`Infill`).
    """
    st = _start(model, prompts, spec, cache, infill)
    n_rows, P = st.x.shape[0], st.prompt_len
    canvas_len = P + spec.max_tokens  # the most it grows to (the last growing block is cut at the budget)
    out: list[list[int]] = [[] for _ in range(n_rows)]
    done = [False] * n_rows
    for b in range(spec.n_blocks):
        lo = P + b * spec.block_length
        hi = min(lo + spec.block_length, canvas_len)
        if spec.growing:
            st.x = mx.concatenate([st.x, mx.full((len(st.rows), hi - lo), spec.mask_id, dtype=mx.int32)], axis=1)
        yield from denoise_block(model, st, spec, b, lo, hi, think_boost_at(spec, lo - P))
        finished, block_tokens = _block_end(st, spec, (lo, hi), out, done, stop_fn)
        st.stats.blocks += 1
        yield BlockDone(b, list(st.rows), block_tokens, finished, st.stats)
        if spec.growing and any(finished):
            keep = [j for j, f in enumerate(finished) if not f]
            if not keep:
                break
            st.keep(keep, spec.cfg_scale > 0)
    mx.eval(st.x)
    if st.kv is not None and n_rows == 1:
        st.kv.end_turn(P + len(out[0]))
    st.stats.output_tokens = sum(len(o) for o in out)
    st.stats.wall_s = time.perf_counter() - st.t0
    st.stats.peak_memory_bytes = mx.get_peak_memory()
    reasons = ["stop" if d else "length" for d in done]
    yield Generation(out, reasons, st.stats, canvas=None if spec.growing else st.x)


def _start(model, prompts, spec: DecodeSpec, kv: Optional[BlockCache], infill: Optional[Infill]) -> DecodeState:
    """A call's state: the prompts left-padded (and the masks after them on a fixed canvas), the key mask,
    the block cache (kv: one kept from an earlier call, or None) with what it may reuse, the random key."""
    t0 = time.perf_counter()
    mx.reset_peak_memory()
    stats = Stats()
    x, key_valid = left_pad(prompts, spec.pad)
    n_rows, P = x.shape
    spec.check(model.args.vocab_size, model.args.max_position_embeddings, P)
    gen_length = spec.max_tokens
    stats.prompt_tokens = n_rows * P if key_valid is None else int(key_valid.sum())
    prompt_mask = mx.concatenate([x != spec.mask_id, mx.zeros((n_rows, gen_length), dtype=mx.bool_)], axis=1)
    if infill is not None and (spec.growing or infill.answer.shape != (n_rows, gen_length)):
        raise IlladaError("an infill needs the fixed canvas and an answer of max_tokens per row")
    if not spec.growing:
        answer = mx.full((n_rows, gen_length), spec.mask_id, dtype=mx.int32) if infill is None else infill.answer
        x = mx.concatenate([x, answer.astype(mx.int32)], axis=1)
    if key_valid is not None:
        key_valid = mx.concatenate([key_valid, mx.ones((n_rows, gen_length), dtype=mx.int32)], axis=1)
    if spec.cache == "none":
        kv = None
    else:
        kv = kv if kv is not None else BlockCache()
        kv.plan_reuse(x, P - 1 if spec.cfg_scale == 0 else 0)  # the prompt's last token is always recomputed
        kv.reserve(P + gen_length)
    key = mx.random.key(spec.seed if spec.seed is not None else int(time.time_ns() % 2**31))
    return DecodeState(x, key_valid, prompt_mask, P, list(range(n_rows)), kv, key, stats, t0, infill=infill)


def think_boost_at(spec: DecodeSpec, written: int) -> float:
    """The end-of-thinking boost of a block that starts `written` reply positions in (0 without one)."""
    if not spec.think_boost:
        return 0.0
    scale, power = spec.think_boost
    return scale * min(max(written / spec.max_tokens, 0.0), 1.0) ** power


def _block_end(st: DecodeState, spec: DecodeSpec, span: tuple[int, int], out: list, done: list, stop_fn):
    """A block's end, the one host sync for the stop checks: per active row, its new tokens cut at a stop
    (none once it is done; appended to out) and whether it is done (done updated)."""
    lo, hi = span
    new = np.array(st.x[:, lo:hi]).tolist()
    finished, block_tokens = [], []
    for j, r in enumerate(st.rows):
        toks = []
        if not done[r]:
            toks, hit = spec.cut_at_stop(new[j])
            out[r].extend(toks)
            said = stop_fn is not None and stop_fn(r, toks)
            done[r] = hit or said
        finished.append(done[r])
        block_tokens.append(toks)
    return finished, block_tokens


def run(events: Iterator, on_event: Optional[Callable] = None) -> Generation:
    """Drain a decode() iterator (calling on_event for each Step/BlockDone) and return the Generation."""
    for ev in events:
        if isinstance(ev, Generation):
            return ev
        if on_event is not None:
            on_event(ev)
    raise RuntimeError("decode ended without a result")


# ------------------------------------------------------------------------------------------ official API
def _spec(model, mask_id, **kw) -> DecodeSpec:
    """A DecodeSpec from explicit arguments, the special ids from the model unless given."""
    a = model.args
    kw.setdefault("eos_id", a.eos_token_id)
    kw.setdefault("eot_id", a.eot_token_id)
    kw.setdefault("pad_id", a.pad_token_id)
    return DecodeSpec(mask_id=a.mask_token_id if mask_id is None else mask_id, **kw)


def generate(
    model,
    prompt,
    steps: int = 128,
    gen_length: int = 128,
    block_length: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: Optional[int] = None,
    attention_mask=None,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    return_stats: bool = False,
    on_event=None,
    **fast,
):
    """The official fixed-canvas `generate`, same parameter names; returns the canvas (B, P + G).

    `prompt` is (B, P) ids (left-padded rows with `attention_mask`, or a list of unequal rows, padded here).
    Fast-mode switches in `fast` (DecodeSpec fields): rule, threshold, factor, entropy_gamma, cache,
    refresh_every, logits_at, seed, eos_id, eot_id. With return_stats=True returns (canvas, Stats).
    """
    if block_length < 1 or gen_length % block_length:
        raise IlladaError(f"gen_length {gen_length} is not a multiple of block_length {block_length}")
    n_blocks = gen_length // block_length
    if n_blocks < 1 or steps % n_blocks:
        raise IlladaError(
            f"steps {steps} is not divisible by the number of blocks {n_blocks} (gen_length/block_length)"
        )
    if attention_mask is not None:
        am = np.array(attention_mask)
        prompt = [[int(t) for t, v in zip(row, m) if v] for row, m in zip(np.array(prompt), am)]
    spec = _spec(
        model,
        mask_id,
        canvas="fixed",
        max_tokens=gen_length,
        steps_per_block=steps // n_blocks,
        block_length=block_length,
        temperature=temperature,
        cfg_scale=cfg_scale,
        remasking=remasking,
        logits_eos_inf=logits_eos_inf,
        confidence_eos_eot_inf=confidence_eos_eot_inf,
        **fast,
    )
    g = run(decode(model, prompt, spec), on_event)
    return (g.canvas, g.stats) if return_stats else g.canvas


def var_generate(
    model,
    prompt,
    steps: int = 32,
    max_tokens: int = 1024,
    block_length: int = 32,
    temperature: float = 0.0,
    mask_id: Optional[int] = None,
    stop: Sequence[str] = (),
    tokenizer=None,
    think_boost: Optional[tuple[float, float]] = None,
    on_event=None,
    **kw,
) -> Generation:
    """iLLaDA's variable-length generation, batched: grow the canvas a block at a time (`steps` steps per
    block), stop a row after the block where EOS/EoT or a stop string appears, cut at the first stop.
    `max_tokens` is the budget. `think_boost=(100, 3)` is iLLaDA-Instruct's end-of-thinking boost.
    With a tokenizer, `texts` holds each row's text."""
    stop = tuple(s for s in stop if s)
    if stop and tokenizer is None:
        raise IlladaError("stop strings need the tokenizer: pass tokenizer=")
    think = think_token_id(tokenizer) if think_boost else None
    spec = _spec(
        model,
        mask_id,
        canvas="growing",
        max_tokens=max_tokens,
        steps_per_block=steps,
        block_length=block_length,
        temperature=temperature,
        stop=stop,
        think_token=kw.pop("think_token", think),
        think_boost=think_boost,
        **kw,
    )
    n = len(prompt)
    texts = [ReplyText(tokenizer, stop) for _ in range(n)] if tokenizer is not None else None
    stop_fn = (lambda r, toks: texts[r].add(toks)) if texts else None
    g = run(decode(model, prompt, spec, stop_fn=stop_fn), on_event)
    if texts:
        g.texts = [t.finish() for t in texts]
    return g
