"""Block KV cache (Fast-dLLM style): what is kept, which window runs, when it is refreshed.

A refresh runs the whole canvas once and keeps every layer's post-RoPE keys/values. Later steps run
only a window of the canvas; its fresh keys/values are spliced between the cached ones:
  - "prefix": window = [block start, canvas end): cached prefix, everything after it recomputed;
  - "dual":   window = [block start, block end): cached prefix *and* cached (masked) suffix.
The cache is approximate (the cached states saw older versions of the canvas): quality is measured
in bench/, and refreshing every step reproduces the uncached forward exactly.

Across calls (chat turns), a cache remembers the canvas of its last refresh: the next call's first refresh
reuses the keys/values of the longest common token prefix and runs only the rest ("extend").
"""

from __future__ import annotations

import mlx.core as mx

CACHES = ("none", "prefix", "dual")


class BlockCache:
    def __init__(self):
        self.keys: dict[int, mx.array] = {}
        self.values: dict[int, mx.array] = {}
        self.refreshing = True
        self.tokens = None  # (1, L) canvas of the last refresh, for reuse by the next call
        self.reuse = 0  # prefix length the next refresh may take from the cache

    def update(self, layer: int, k: mx.array, v: mx.array, offset: int):
        if self.refreshing:  # a refresh: keep everything (after the reused prefix when extending)
            if offset:
                k = mx.concatenate([self.keys[layer][:, :, :offset], k], axis=2)
                v = mx.concatenate([self.values[layer][:, :, :offset], v], axis=2)
            self.keys[layer], self.values[layer] = k, v
            return k, v
        end = offset + k.shape[2]
        K, V = self.keys[layer], self.values[layer]
        ks, vs = [K[:, :, :offset], k], [V[:, :, :offset], v]
        if end < K.shape[2]:
            ks.append(K[:, :, end:])
            vs.append(V[:, :, end:])
        return mx.concatenate(ks, axis=2), mx.concatenate(vs, axis=2)

    def plan_reuse(self, canvas: mx.array, limit: int) -> None:
        """Before a new call: how much of `canvas` (batch 1) the cache already holds, at most `limit`."""
        self.reuse = 0
        if self.tokens is None or canvas.shape[0] != 1 or self.tokens.shape[0] != 1:
            return
        n = min(self.tokens.shape[1], canvas.shape[1], limit)
        same = (self.tokens[0, :n] == canvas[0, :n]).astype(mx.int32)
        self.reuse = int(mx.cumprod(same).sum()) if n > 0 else 0

    def state(self):
        return list(self.keys.values()) + list(self.values.values())


def window(mode: str, block_start: int, block_end: int, canvas_len: int) -> tuple[int, int]:
    """The canvas slice a cached step runs."""
    return (block_start, canvas_len) if mode == "prefix" else (block_start, block_end)


def refresh_due(mode: str, step_in_block: int, every: int) -> bool:
    """Refresh policy: always without a cache; at every block start; and every `every` steps (0 = never)."""
    return mode == "none" or step_in_block == 0 or (every > 0 and step_in_block % every == 0)
