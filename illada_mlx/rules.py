"""Schedules and commit rules: small device-side functions the sampler composes.

Every rule takes `conf` (B, K): the confidence of each candidate position, −inf where there is nothing
to commit (not masked, outside the block), and returns a boolean (B, K) transfer mask. The adaptive
rules commit at least the single best candidate of a row that has any.
"""

from __future__ import annotations

import mlx.core as mx

RULES = ("schedule", "threshold", "factor", "entropy", "error")


def transfer_counts(n_masked: int, steps: int) -> list[int]:
    """The official per-block schedule: step t commits floor(n/s) + (1 if t < n mod s) tokens."""
    return [n_masked // steps + (1 if t < n_masked % steps else 0) for t in range(steps)]


def _ranks(score: mx.array) -> mx.array:
    """rank[b, i] = position of i when row b is sorted by descending score (0 = best)."""
    order = mx.argsort(-score, axis=-1)
    return mx.argsort(order, axis=-1), order


def commit_topk(conf: mx.array, k: mx.array) -> mx.array:
    """Commit the k[b] most confident candidates of each row (the official low-confidence remasking)."""
    rank, _ = _ranks(conf)
    return (rank < k[:, None]) & (conf > -mx.inf)


def commit_threshold(conf: mx.array, tau: float) -> mx.array:
    """Fast-dLLM: every candidate with confidence ≥ τ, and at least the best one."""
    rank, _ = _ranks(conf)
    return ((conf >= tau) | (rank == 0)) & (conf > -mx.inf)


def _prefix_commit(conf: mx.array, ok_sorted: mx.array, order: mx.array, rank: mx.array) -> mx.array:
    """Commit the longest prefix (in `order`) whose every element satisfies `ok_sorted`, at least one."""
    count = mx.maximum(mx.cumprod(ok_sorted.astype(mx.int32), axis=-1).sum(-1), 1)
    return (rank < count[:, None]) & (conf > -mx.inf)


def commit_factor(conf: mx.array, f: float) -> mx.array:
    """Fast-dLLM's factor rule: the longest prefix of the sorted confidences with (n+1)(1 − c_n) < f."""
    rank, order = _ranks(conf)
    c = mx.take_along_axis(conf, order, axis=-1)
    n = mx.arange(1, conf.shape[-1] + 1, dtype=mx.float32)
    return _prefix_commit(conf, (n + 1) * (1 - c) < f, order, rank)


def commit_entropy(conf: mx.array, entropy: mx.array, gamma: float) -> mx.array:
    """EB-sampler: take candidates by increasing entropy while Σ entropies − the largest ≤ γ."""
    h = mx.where(conf > -mx.inf, entropy, mx.inf)
    rank, order = _ranks(-h)
    hs = mx.take_along_axis(h, order, axis=-1)
    csum = mx.cumsum(mx.where(mx.isinf(hs), 0.0, hs), axis=-1)
    return _prefix_commit(conf, (csum - hs <= gamma) & ~mx.isinf(hs), order, rank)


def commit_stable(conf: mx.array, x0: mx.array, before: mx.array, tau: float) -> mx.array:
    """Stable commits, beside an adaptive rule: the candidates with confidence ≥ τ that the block's previous
    step predicted the same (`before`: its candidate at each position, −1 where it had none), KLASS's
    stability test in its simplest form: a prediction the previous step's commits did not change is not
    waiting on them."""
    return (conf > -mx.inf) & (conf >= tau) & (before == x0)


def commit_error(conf: mx.array, eps: float) -> mx.array:
    """Error-bounded commits: candidates by decreasing confidence while the sum of their error
    probabilities, Σ (1 − c), stays ≤ ε (a union bound on the chance that any of them is wrong under the
    model's own marginals), and at least the best one."""
    rank, order = _ranks(conf)
    c = mx.take_along_axis(conf, order, axis=-1)
    err = mx.cumsum(mx.where(c > -mx.inf, 1 - c, mx.inf), axis=-1)
    return _prefix_commit(conf, err <= eps, order, rank)
