"""Candidates and confidences over the vocabulary: one pass per position, no (L, V) probability array.

`candidates(logits, temperature, key, want_entropy)` returns, per position, the candidate token (argmax at
T = 0, Gumbel-max at T > 0), its softmax probability, and optionally the entropy. `filter_logits` cuts
the distribution to top_k / top_p / min_p first when the sampler samples (T > 0). The pure-MLX version
here is the reference; see kernels_gpu.py for the Metal/CUDA versions and when they are used.
"""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx

from .kernels_gpu import fused_candidates


def gumbel_uniforms(key: mx.array, shape) -> mx.array:
    """The uniforms behind Gumbel-max, u in (0, 1) (u = 0 would make −log u infinite)."""
    return mx.clip(mx.random.uniform(shape=shape, key=key), 1e-20, 1.0)


def candidates_reference(
    logits: mx.array, temperature: float = 0.0, key: Optional[mx.array] = None, want_entropy: bool = False
):
    """(x0, p(x0), entropy | None) for logits (..., V).

    Gumbel-max as the official code means it, exp(l) / (−log u)^T, but in log space
    (l − T·log(−log u)): the same argmax without float64 or overflow.
    """
    l = logits.astype(mx.float32)
    lse = mx.logsumexp(l, axis=-1)
    if temperature > 0:
        u = gumbel_uniforms(key, l.shape)
        x0 = mx.argmax(l - temperature * mx.log(-mx.log(u)), axis=-1)
        lx = mx.take_along_axis(l, x0[..., None], axis=-1)[..., 0]
    else:
        x0 = mx.argmax(l, axis=-1)
        lx = mx.max(l, axis=-1)
    p = mx.exp(lx - lse)
    ent = None
    if want_entropy:
        # reuses lse (no second softmax reduction); 0 · log 0 = 0: banned ids carry −inf logits
        # (the mask token always), and 0 · −inf is NaN
        ent = lse - mx.where(l > -mx.inf, mx.exp(l - lse[..., None]) * l, 0.0).sum(-1)
    return x0.astype(mx.int32), p, ent


def filter_logits(logits: mx.array, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> mx.array:
    """The candidate distribution cut to what top_k, top_p and min_p keep (the rest at −inf), per position;
    the most likely candidate always stays."""
    if top_k <= 0 and top_p >= 1.0 and min_p <= 0.0:
        return logits
    l = logits.astype(mx.float32)
    keep = mx.ones(l.shape, dtype=mx.bool_)
    if min_p > 0.0:  # p ≥ min_p · p_max  <=>  l ≥ l_max + log(min_p)
        keep = keep & (l >= mx.max(l, axis=-1, keepdims=True) + math.log(min_p))
    if top_k > 0 or top_p < 1.0:
        order = mx.argsort(-l, axis=-1)
        ranked = mx.take_along_axis(l, order, axis=-1)
        ok = mx.ones(l.shape, dtype=mx.bool_)
        if top_k > 0:
            ok = ok & (mx.arange(l.shape[-1]) < top_k)
        if top_p < 1.0:  # keep a candidate while the mass before it is under top_p
            probs = mx.softmax(ranked, axis=-1)
            ok = ok & (mx.cumsum(probs, axis=-1) - probs < top_p)
        keep = keep & mx.put_along_axis(mx.zeros(l.shape, dtype=mx.bool_), order, ok, axis=-1)
    return mx.where(keep, logits, -mx.inf)


def candidates(logits, temperature=0.0, key=None, want_entropy=False):
    """The dispatching entry point the sampler calls."""
    fused = fused_candidates(logits, temperature, want_entropy)
    if fused is not None:
        return fused
    return candidates_reference(logits, temperature, key, want_entropy)
