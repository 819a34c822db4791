"""Block KV cache (Fast-dLLM style, with dKV-Cache's delayed caching): what is kept, which window runs,
when what is recomputed.

Every layer's post-RoPE keys/values live in one preallocated buffer per layer, (B, kv_heads, capacity,
head_dim), sized to the canvas and grown in chunks; a forward of the window [offset, offset + L) writes
its keys/values into the buffer in place and attends over the buffer's first `length` positions (the
canvas). Which window a forward runs:
  - a full refresh: the whole canvas (after the prefix reused from an earlier call);
  - a block start under the "window" policy: the block just finished (its keys/values computed once more
    with its final tokens, one block after it was committed) and the new block, to the step window's end;
  - a step: "prefix" = [block start, canvas end), "dual" = [block start, block end) (the masked suffix
    stays as cached); "token" = the positions the previous step ran, i.e. the block's masks and the tokens
    the previous step committed (dKV-Cache's delay at the token level: a committed token's keys/values are
    computed once more with it in place, one step after its commit, then kept for the rest of the block).
The cache is approximate (cached states saw older versions of the canvas): quality is measured in
bench/, and refreshing every step reproduces the uncached forward exactly.

`ids` records the token each position held when its keys/values were last written; a later call (the
next chat turn) reuses the longest common prefix of its canvas with them, up to where the cached states
stop being final ("extend"). Under bidirectional attention a state depends on what follows it, so:
  - `settled`: a block-start refresh has computed every position before its block with the tokens they
    end with; the reply's last block, written while it was being committed, never is;
  - `turn_delay` = 1 (the default): a turn's own prompt and reply were computed as the conversation's last
    turn, followed by masks, which no later turn sees. The next call recomputes them, with its new user
    turn after them (dKV-Cache's delayed caching, a turn at a time), and reuses what the calls before
    computed; 0 reuses the last turn too, up to `settled` (docs/decoding.md says what each costs).
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

CACHES = ("none", "prefix", "dual", "token")
# what a block start recomputes: the whole canvas; the last two blocks; or the last two blocks and probes of
# the positions before them, then the whole canvas if the probes' keys moved (`BlockCache.probe`)
REFRESHES = ("full", "window", "drift")
CHUNK = 256  # buffers grow in steps of this many positions


class BlockCache:
    def __init__(self, turn_delay: int = 1):
        self.keys: list[mx.array] = []  # per layer, (B, kv_heads, capacity, head_dim)
        self.values: list[mx.array] = []
        self.ids: Optional[mx.array] = None  # (B, capacity) int32, -1 where nothing was written
        self.length = 0  # positions a forward attends over (the canvas)
        self.capacity = 0  # positions the buffers hold
        self.reuse = 0  # prefix length the next call's first refresh may take from the cache
        self.settled = 0  # positions before it were last computed with their final tokens (block starts)
        self.turn_delay = turn_delay  # the last calls whose prompt and reply the next call recomputes
        self.turn_ends: list[int] = []  # per finished call (batch 1), where its reply ended, oldest first
        self.probes = 0  # the next scattered forward's first this many positions are drift probes
        self._drift: Optional[mx.array] = None  # (B, probes): Σ over layers and heads of 1 − cos(old, new key)
        self._drift_terms = 0  # how many (layer, head) terms _drift sums

    def reserve(self, capacity: int) -> None:
        """Make room for a canvas of `capacity` positions before the buffers are first written."""
        self.capacity = max(self.capacity, capacity)

    def window(self, length: int) -> None:
        """The next forwards attend over the canvas's first `length` positions."""
        self.length = length

    def skip(self, n: int) -> None:
        """The next full refresh starts at position n: what is before it is reused (or never run: padding)."""
        self.reuse = n

    def take_reuse(self) -> int:
        """Where a full refresh starts (the prefix it reuses); the refreshes after it start at 0."""
        n, self.reuse = self.reuse, 0
        return n

    def settle(self, position: int) -> None:
        """A block-start refresh computed every position before `position` with its final tokens."""
        self.settled = position

    def _room(self, layer: int, k: mx.array, v: mx.array, end: int) -> None:
        B, H, _, D = k.shape
        if layer < len(self.keys) and self.keys[layer].shape[0] == B and end <= self.keys[layer].shape[2]:
            return
        size = self.capacity if self.capacity >= end else -(-end // CHUNK) * CHUNK
        grow_k = mx.zeros((B, H, size, D), k.dtype)
        grow_v = mx.zeros((B, H, size, v.shape[3]), v.dtype)
        if layer < len(self.keys) and self.keys[layer].shape[0] == B:  # keep what is there
            n = self.keys[layer].shape[2]
            grow_k[..., :n, :] = self.keys[layer]
            grow_v[..., :n, :] = self.values[layer]
        if layer < len(self.keys):
            self.keys[layer], self.values[layer] = grow_k, grow_v
        else:
            self.keys.append(grow_k)
            self.values.append(grow_v)
        self.capacity = max(self.capacity, size)

    def update(self, layer: int, k: mx.array, v: mx.array, offset: int):
        """Write the window's keys/values at [offset, offset + L); return the canvas's keys/values."""
        end = offset + k.shape[2]
        self._room(layer, k, v, end)
        self.keys[layer][..., offset:end, :] = k
        self.values[layer][..., offset:end, :] = v
        self.length = max(self.length, end)
        return self._canvas(layer)

    def update_at(self, layer: int, k: mx.array, v: mx.array, positions: mx.array):
        """Write keys/values (B, H, L, D) at canvas positions (B, L) already in the buffers; return the
        canvas's keys/values."""
        if self.probes:
            self._measure(layer, k, positions)
        at = positions[:, None, :, None]
        self.keys[layer] = mx.put_along_axis(self.keys[layer], mx.broadcast_to(at, k.shape), k, axis=2)
        self.values[layer] = mx.put_along_axis(self.values[layer], mx.broadcast_to(at, v.shape), v, axis=2)
        return self._canvas(layer)

    def probe(self, n: int) -> None:
        """The next scattered forward's first n positions are probes: before their fresh keys are written,
        each is compared with the key the cache held there (`drift`)."""
        self.probes, self._drift, self._drift_terms = n, None, 0

    def _measure(self, layer: int, k: mx.array, positions: mx.array) -> None:
        n = self.probes
        at = mx.broadcast_to(positions[:, None, :n, None], (*k.shape[:2], n, k.shape[3]))
        old = mx.take_along_axis(self.keys[layer], at, axis=2).astype(mx.float32)
        new = k[:, :, :n].astype(mx.float32)
        cos = (old * new).sum(-1) / mx.maximum(mx.linalg.norm(old, axis=-1) * mx.linalg.norm(new, axis=-1), 1e-12)
        d = (1 - cos).sum(axis=1)  # (B, n) over this rank's heads
        self._drift = d if self._drift is None else self._drift + d
        self._drift_terms += k.shape[1]

    def drift(self, group=None) -> mx.array:
        """(B,): the largest probe drift of the last probed forward, 1 − the cosine similarity of a probe's
        fresh key with the cached one, averaged over layers and heads (all ranks' heads under tensor
        parallelism). 0 for a row whose probes did not move."""
        d, terms = self._drift, self._drift_terms
        self.probes, self._drift = 0, None
        if group is not None and group.size() > 1:
            d = mx.distributed.all_sum(d, group=group)
            terms *= group.size()
        return (d / max(terms, 1)).max(axis=1)

    def _canvas(self, layer: int):
        """The layer's keys/values over the canvas (the buffers' first `length` positions)."""
        n, K, V = self.length, self.keys[layer], self.values[layer]
        return (K, V) if n == K.shape[2] else (K[..., :n, :], V[..., :n, :])

    def record_at(self, tokens: mx.array, positions: mx.array) -> None:
        """The tokens (B, L) whose keys/values a forward just wrote at positions (B, L)."""
        self.ids = mx.put_along_axis(self.ids, positions, tokens, axis=1)

    def record(self, tokens: mx.array, offset: int) -> None:
        """The tokens (B, L) whose keys/values a forward just wrote at [offset, offset + L)."""
        B, end = tokens.shape[0], offset + tokens.shape[1]
        if self.ids is None or self.ids.shape[0] != B or self.ids.shape[1] < end:
            grown = mx.full((B, max(self.capacity, end)), -1, dtype=mx.int32)
            if self.ids is not None and self.ids.shape[0] == B:
                grown[:, : self.ids.shape[1]] = self.ids
            self.ids = grown
        self.ids[:, offset:end] = tokens

    def keep(self, rows: mx.array) -> None:
        """Keep only these rows of the batch (the others finished)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.ids = None if self.ids is None else self.ids[rows]

    def rows(self, idx: mx.array) -> "BlockCache":
        """A cache of these rows alone (copies), to run a forward for part of the batch (`put_rows`)."""
        out = BlockCache(self.turn_delay)
        out.keys = [k[idx] for k in self.keys]
        out.values = [v[idx] for v in self.values]
        out.ids = None if self.ids is None else self.ids[idx]
        out.length, out.capacity, out.settled = self.length, self.capacity, self.settled
        return out

    def put_rows(self, idx: mx.array, part: "BlockCache") -> None:
        """Write back the rows `rows(idx)` gave, after their forward."""
        for layer in range(len(self.keys)):
            self.keys[layer][idx] = part.keys[layer]
            self.values[layer][idx] = part.values[layer]
        if self.ids is not None and part.ids is not None:
            self.ids[idx] = part.ids

    def merge(self, other: "BlockCache") -> "BlockCache":
        """One cache of this one's rows then `other`'s (the buffers padded to the larger capacity); what
        either reused or settled is not carried (a new cache's)."""
        out = BlockCache()
        out.keys = [_cat(a, b) for a, b in zip(self.keys, other.keys)]
        out.values = [_cat(a, b) for a, b in zip(self.values, other.values)]
        out.ids = _cat(self.ids, other.ids, -1) if self.ids is not None and other.ids is not None else None
        out.length = max(self.length, other.length)
        out.capacity = out.keys[0].shape[2] if out.keys else max(self.capacity, other.capacity)
        return out

    def plan_reuse(self, canvas: mx.array, limit: int) -> None:
        """Before a new call: how much of `canvas` (batch 1) the cache already holds, at most `limit`."""
        self.reuse = 0
        if self.ids is None or canvas.shape[0] != 1 or self.ids.shape[0] != 1:
            return
        final = (
            self.settled
            if self.turn_delay == 0
            else (self.turn_ends[-1 - self.turn_delay] if len(self.turn_ends) > self.turn_delay else 0)
        )
        n = min(self.ids.shape[1], canvas.shape[1], limit, final)
        if n > 0:
            same = (self.ids[0, :n] == canvas[0, :n]).astype(mx.int32)
            self.reuse = int(mx.cumprod(same).sum())

    def end_turn(self, end: int) -> None:
        """A call (batch 1) finished with its reply ending at position `end`."""
        self.turn_ends = self.turn_ends[-self.turn_delay - 1 :] + [end]

    def state(self):
        return self.keys + self.values


def _cat(x: mx.array, y: mx.array, fill=0) -> mx.array:
    """x's rows then y's, the position axis (2 of keys/values, 1 of ids) padded to the longer with `fill`."""
    axis = 2 if x.ndim == 4 else 1
    n = max(x.shape[axis], y.shape[axis])
    return mx.concatenate([_grow(x, n, axis, fill), _grow(y, n, axis, fill)])


def _grow(x: mx.array, n: int, axis: int, fill) -> mx.array:
    if x.shape[axis] == n:
        return x
    shape = list(x.shape)
    shape[axis] = n - x.shape[axis]
    return mx.concatenate([x, mx.full(shape, fill, dtype=x.dtype)], axis=axis)


def step_window(policy: str, block_start: int, block_end: int, canvas_len: int) -> tuple[int, int]:
    """The canvas slice a cached step runs under the cache policy (one of CACHES)."""
    return (block_start, canvas_len) if policy == "prefix" else (block_start, block_end)


def refresh_kind(policy: str, refresh: str, block: int, step: int, every: int, full_every: int) -> Optional[str]:
    """What a forward recomputes: "full" (the canvas), "window" (the last block again + the new one, at a
    block start), "drift" (the window and probes, at a block start) or None (the step window). Always full
    without a cache, at the first block and every `every` steps (0 = never); at a block start per the
    policy, with a full refresh every `full_every` blocks (0 = never) under the window and drift policies."""
    if policy == "none" or (every > 0 and step % every == 0):
        return "full"
    if step:
        return None
    if block == 0 or refresh == "full" or (full_every > 0 and block % full_every == 0):
        return "full"
    return "drift" if refresh == "drift" else "window"
