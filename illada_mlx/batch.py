"""Continuous batching on the growing canvas: rows of one DecodeSpec decoded together, new rows joining at
block boundaries and finished rows leaving (the server's worker drives it).

    batch = Batch(model, spec)
    batch.add(Row(handle, prompt_ids, budget))     # joins at the next block
    while batch.rows or batch.joining:
        for row, tokens, reason in batch.run_block(stop_fn): ...   # reason: None, "stop" or "length"

All rows share one canvas width. The first rows are left-padded to the longest prompt, as in decode.py; a
row joining later is left-padded so that its prompt ends where the running rows' next block starts, so it
fits only when its prompt is no longer than the canvas so far and its budget within the positions left
(`fits`). Every row's block then spans the same positions, and decode.py's `denoise_block` runs it.

With a block cache the join block's first forward is two forwards: the running rows recompute what a
block start recomputes (cache.refresh_kind), the joining rows their whole canvas, as they would alone;
their cache rows are then one cache (BlockCache.merge). So each row's tokens at temperature 0 are those it
gets decoded alone, up to the float rounding of a different batch shape. `batch_key` says which specs can
share a batch.

A row can also leave mid-block (run_block's `leave`, asked after every step: a client that went away): its
canvas, key mask and cache rows are dropped there (DecodeState.keep, BlockCache.keep) and the block goes on
for the others, which decode as they would have without it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import mlx.core as mx

from .cache import BlockCache
from .decode import DecodeState, Stats, Step, denoise_block, forward_logits
from .spec import DecodeSpec


def batch_key(spec: DecodeSpec) -> Optional[DecodeSpec]:
    """What requests must share to decode in one batch: the spec apart from seed, stop strings and budget.
    None for a spec that is decoded alone: a fixed canvas, CFG, the think boost, periodic full refreshes,
    a budget that is not whole blocks, or random draws with a seed (they depend on the batch)."""
    if (
        not spec.growing
        or spec.cfg_scale > 0
        or spec.think_boost
        or spec.full_refresh_every
        or spec.max_tokens % spec.block_length
        or ((spec.temperature > 0 or spec.remasking == "random") and spec.seed is not None)
    ):
        return None
    return replace(spec, seed=None, stop=(), max_tokens=spec.block_length)


@dataclass
class Row:
    handle: object  # the caller's
    ids: list[int]
    budget: int  # tokens, whole blocks
    top_logprobs: int = -1  # -1: no log-probabilities; k ≥ 0: the committed token's and k alternatives
    produced: int = 0
    blocks: int = 0
    nfe_at_join: int = 0
    t0: float = field(default_factory=time.perf_counter)


@dataclass
class BlockLogprobs:
    """Per row, per position of the block: the log-probability of its token at the step that committed it
    (the model's log-softmax over the candidate logits), and the k most likely tokens there."""

    token: list  # (rows, block) floats
    top_ids: Optional[list] = None  # (rows, block, k)
    top: Optional[list] = None

    def row(self, j: int, n: int) -> "BlockLogprobs":
        """Row j's figures, its first n positions (its tokens before a stop)."""
        return BlockLogprobs(
            self.token[j][:n], self.top_ids[j][:n] if self.top_ids else None, self.top[j][:n] if self.top else None
        )


class LogprobTracker:
    """Collects BlockLogprobs from a block's Step events (positions lo..lo+size of the canvas)."""

    def __init__(self, k: int):
        self.k = k

    def start(self, rows: int, lo: int, size: int) -> None:
        self.lo = lo
        self.lp = mx.zeros((rows, size))
        self.ids = mx.zeros((rows, size, self.k), dtype=mx.int32) if self.k else None
        self.top = mx.zeros((rows, size, self.k)) if self.k else None

    def step(self, ev: Step) -> None:
        rel = ev.positions - self.lo
        lp = ev.logits.astype(mx.float32)
        lp = lp - mx.logsumexp(lp, axis=-1, keepdims=True)
        tok = mx.take_along_axis(ev.canvas, ev.positions, axis=1)
        tok_lp = mx.take_along_axis(lp, tok[..., None], axis=-1)[..., 0]
        put = lambda a, v: _put(a, rel, ev.committed, v)  # noqa: E731
        self.lp = put(self.lp, tok_lp)
        if self.k:
            ids = mx.argpartition(-lp, kth=self.k - 1, axis=-1)[..., : self.k]
            vals = mx.take_along_axis(lp, ids, axis=-1)
            order = mx.argsort(-vals, axis=-1)
            self.ids = put(self.ids, mx.take_along_axis(ids, order, axis=-1).astype(mx.int32))
            self.top = put(self.top, mx.take_along_axis(vals, order, axis=-1))

    def keep(self, idx: list[int]) -> None:
        """Keep these rows' figures (the others left the batch)."""
        i = mx.array(idx)
        self.lp = self.lp[i]
        if self.k:
            self.ids, self.top = self.ids[i], self.top[i]

    def result(self) -> BlockLogprobs:
        return BlockLogprobs(
            self.lp.tolist(), self.ids.tolist() if self.k else None, self.top.tolist() if self.k else None
        )


StopFn = Callable[[Row, list[int]], bool]


class Batch:
    def __init__(self, model, spec: DecodeSpec):
        self.model, self.spec = model, spec
        self.positions = model.args.max_position_embeddings
        self.rows: list[Row] = []  # running, in the order of the state's rows
        self.joining: list[Row] = []
        self.st: Optional[DecodeState] = None
        self.stats = Stats()
        self.blocks = 0
        self._split: Optional[int] = None  # rows before this index ran before the join block
        self._fresh = False  # every row starts at the next block
        self.lo = 0  # the canvas position where the running block starts

    @property
    def size(self) -> int:
        return len(self.rows) + len(self.joining)

    def fits(self, prompt_len: int, budget: int) -> bool:
        """Whether a row with this prompt and budget can join at the next block."""
        if self.st is None:
            width = max([len(r.ids) for r in self.joining] + [prompt_len])
            return all(width + r.budget <= self.positions for r in self.joining + [Row(None, [0] * prompt_len, budget)])
        width = self.st.x.shape[1]
        return prompt_len <= width and width + budget <= self.positions

    def add(self, row: Row) -> None:
        self.joining.append(row)

    def remove(self, handles: set) -> list[Row]:
        """Take these rows out now (cancelled, out of time); return them."""
        gone = [r for r in self.rows + self.joining if r.handle in handles]
        self.joining = [r for r in self.joining if r.handle not in handles]
        keep = [j for j, r in enumerate(self.rows) if r.handle not in handles]
        if len(keep) < len(self.rows):
            self._keep(keep)
        return gone

    def _keep(self, idx: list[int]) -> None:
        if not idx:
            self.rows, self.st = [], None
            return
        self.st.keep(idx, False)
        self.rows = [self.rows[j] for j in idx]

    def _join(self) -> None:
        """Append the joining rows to the state, left-padded to its width."""
        new, self.joining = self.joining, []
        if not new:
            self._split = None
            return
        spec, pad = self.spec, self.spec.pad
        width = self.st.x.shape[1] if self.st is not None else max(len(r.ids) for r in new)
        x = mx.array([[pad] * (width - len(r.ids)) + r.ids for r in new], dtype=mx.int32)
        valid = mx.array([[0] * (width - len(r.ids)) + [1] * len(r.ids) for r in new], dtype=mx.int32)
        for r in new:
            r.nfe_at_join = self.stats.nfe
        if self.st is None:
            kv = None if spec.cache == "none" else BlockCache()
            seed = spec.seed if spec.seed is not None else time.time_ns() % 2**31
            self.st = DecodeState(
                x, valid, x != spec.mask_id, width, [], kv, mx.random.key(seed), self.stats, time.perf_counter()
            )
            self._split, self._fresh = None, True
        else:
            st = self.st
            self._split = len(self.rows) if st.kv is not None else None
            st.x = mx.concatenate([st.x, x])
            st.key_valid = mx.concatenate([st.key_valid, valid])
            st.prompt_mask = mx.concatenate([st.prompt_mask, x != spec.mask_id])
        self.rows += new
        self.st.rows = list(range(len(self.rows)))
        if self.st.kv is not None:
            self.st.kv.reserve(width + max(r.budget - r.produced for r in self.rows))

    def _forward(self, model, st, spec, pos, lo, hi, kind, query=None):
        """decode.forward_logits, except at a join block's first forward with a cache: the running rows
        recompute what their block start does, the joining rows their whole canvas (a cache of their own,
        merged)."""
        n, self._split = self._split, None
        if n is None or n == 0:
            return forward_logits(model, st, spec, pos, lo, hi, kind, query)
        old = DecodeState(
            st.x[:n],
            st.key_valid[:n],
            st.prompt_mask[:n],
            st.prompt_len,
            st.rows[:n],
            st.kv,
            st.key,
            st.stats,
            st.t0,
        )
        fresh = BlockCache()
        fresh.reserve(st.kv.capacity)
        fresh.skip(min(lo - len(r.ids) for r in self.rows[n:]))  # the joining rows' padding: not run
        new = DecodeState(
            st.x[n:], st.key_valid[n:], st.prompt_mask[n:], st.prompt_len, st.rows[n:], fresh, st.key, st.stats, st.t0
        )
        a = forward_logits(model, old, spec, pos[:n], lo, hi, kind)
        b = forward_logits(model, new, spec, pos[n:], lo, hi, "full")
        st.kv = st.kv.merge(fresh)
        return mx.concatenate([a, b])

    def run_block(
        self,
        stop_fn: Optional[StopFn] = None,
        logprobs: Optional[LogprobTracker] = None,
        on_step: Optional[Callable[[Step], None]] = None,
        leave: Optional[Callable[[Row], bool]] = None,
    ):
        """Join the waiting rows, denoise one block for every row, and drop the finished ones. Returns
        (row, its new tokens cut at a stop, finish reason or None, BlockLogprobs row or None) per row.
        on_step: called with every denoising Step (row j of the Step is self.rows[j], the block starts at
        canvas position self.lo). leave: asked after every step for each row; the rows it names leave the
        batch there (the others decode on as they would without them) and come back with finish reason
        "cancelled" and no tokens."""
        self._join()
        st, spec = self.st, self.spec
        lo = st.x.shape[1]
        hi = lo + spec.block_length
        B = len(self.rows)
        self.lo = lo
        st.x = mx.concatenate([st.x, mx.full((B, hi - lo), spec.mask_id, dtype=mx.int32)], axis=1)
        st.key_valid = mx.concatenate([st.key_valid, mx.ones((B, hi - lo), dtype=mx.int32)], axis=1)
        st.prompt_mask = mx.concatenate([st.prompt_mask, mx.zeros((B, hi - lo), dtype=mx.bool_)], axis=1)
        index, self._fresh = (0 if self._fresh else 1), False  # 0: every row starts here (a full forward)
        if logprobs is not None:
            logprobs.start(B, lo, hi - lo)
        left: list[Row] = []
        for ev in denoise_block(self.model, st, spec, index, lo, hi, 0.0, forward=self._forward):
            if logprobs is not None:
                logprobs.step(ev)
            if on_step is not None:
                on_step(ev)
            if leave is not None and self._leave(leave, logprobs, left) == 0:
                break  # nobody is left: the block ends here
        gone = [(r, [], "cancelled", None) for r in left]
        return gone + (self._block_end(stop_fn, logprobs, lo, hi) if self.rows else [])

    def _block_end(self, stop_fn: Optional[StopFn], logprobs: Optional[LogprobTracker], lo: int, hi: int) -> list:
        """The block's tokens per row, cut at a stop, and its finish reason; the finished rows leave."""
        st, spec, B = self.st, self.spec, len(self.rows)
        self.blocks += 1
        self.stats.blocks += 1
        new = st.x[:, lo:hi].tolist()
        lp = logprobs.result() if logprobs is not None else None
        out, keep = [], []
        for j, r in enumerate(self.rows):
            toks, hit = spec.cut_at_stop(new[j])
            r.produced += hi - lo
            r.blocks += 1
            said = stop_fn is not None and stop_fn(r, toks)
            reason = "stop" if hit or said else ("length" if r.produced >= r.budget else None)
            out.append((r, toks, reason, None if lp is None else lp.row(j, len(toks))))
            if reason is None:
                keep.append(j)
        if len(keep) < B:
            self._keep(keep)
            if logprobs is not None and keep:
                logprobs.keep(keep)
        return out

    def _leave(self, leave: Callable[[Row], bool], logprobs: Optional[LogprobTracker], left: list) -> int:
        """Mid-block: the rows `leave` names go (appended to `left`); returns how many rows stay."""
        keep = [j for j, r in enumerate(self.rows) if not leave(r)]
        if len(keep) < len(self.rows):
            left += [r for j, r in enumerate(self.rows) if j not in keep]
            self._keep(keep)
            if logprobs is not None and keep:
                logprobs.keep(keep)
        return len(keep)

    def row_stats(self, r: Row, output_tokens: int) -> Stats:
        """A row's figures: the forwards the batch ran while it was in it, its tokens and time."""
        return Stats(
            nfe=self.stats.nfe - r.nfe_at_join,
            output_tokens=output_tokens,
            prompt_tokens=len(r.ids),
            blocks=r.blocks,
            wall_s=time.perf_counter() - r.t0,
            committed=r.produced,
        )


def _put(a: mx.array, rel: mx.array, committed: mx.array, v: mx.array) -> mx.array:
    """a (B, size[, k]) with v (B, K[, k]) written at the block positions rel (B, K) that were committed."""
    if a.ndim == 3:
        rel = mx.broadcast_to(rel[..., None], v.shape)
        committed = committed[..., None]
    return mx.put_along_axis(a, rel, mx.where(committed, v, mx.take_along_axis(a, rel, axis=1)), axis=1)
