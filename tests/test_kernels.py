"""Each GPU kernel against the pure-MLX reference (skipped where its backend is absent: Metal on a Mac,
CUDA on MLX's CUDA backend). The reference itself is tested in test_rules.py; filter_logits against numpy."""

import mlx.core as mx
import numpy as np
import pytest

from illada_mlx import kernels_gpu
from illada_mlx.kernels import candidates, candidates_reference


@pytest.mark.parametrize("kind", ["metal", "cuda"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("V", [97, 4096, 155136])
def test_gpu_kernel_matches_reference(kind, dtype, V):
    if kernels_gpu.backend() != kind:
        pytest.skip(f"no {kind} backend here")
    rng = np.random.default_rng(V)
    logits = rng.normal(0, 4, (3, 7, V)).astype(np.float32)
    logits[0, 0, 5] = -np.inf  # masked-out ids (mask token, EOS knob)
    logits[1, 2, :3] = 50.0  # a tie: the first index wins, like mx.argmax
    lx = mx.array(logits).astype(dtype)
    x0, p, ent = kernels_gpu.candidates_kernel(lx, kind)
    rx0, rp, rent = candidates_reference(lx, 0.0, None, True)
    assert (np.array(x0) == np.array(rx0)).all()
    np.testing.assert_allclose(np.array(p), np.array(rp), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.array(ent), np.array(rent), rtol=1e-3, atol=1e-4)


def test_dispatch_falls_back_to_reference_without_gpu_or_opt_in(monkeypatch):
    monkeypatch.delenv("ILLADA_MLX_KERNELS", raising=False)
    kernels_gpu.enabled_backend.cache_clear()  # the choice is made once per process
    logits = mx.array(np.random.default_rng(0).normal(size=(2, 3, 50)).astype(np.float32))
    got = candidates(logits, 0.0, None, True)
    ref = candidates_reference(logits, 0.0, None, True)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(np.array(a), np.array(b))
    assert kernels_gpu.fused_candidates(logits, 0.7, False) is None  # Gumbel always takes the reference


def test_filter_logits_against_numpy():
    import numpy as np

    from illada_mlx.kernels import filter_logits

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 50)).astype(np.float32) * 3
    for top_k, top_p, min_p in [(5, 1.0, 0.0), (0, 0.7, 0.0), (0, 1.0, 0.2), (7, 0.9, 0.05), (1, 1.0, 0.0)]:
        got = np.isfinite(np.array(filter_logits(mx.array(logits), top_p, top_k, min_p)))
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        want = np.ones_like(got)
        order = np.argsort(-p, axis=-1)
        ranked = np.take_along_axis(p, order, -1)
        before = np.cumsum(ranked, -1) - ranked
        keep_sorted = (before < top_p) & ((np.arange(50) < top_k) if top_k else True)
        np.put_along_axis(want, order, keep_sorted, -1)
        want &= p >= min_p * p.max(-1, keepdims=True)
        assert (got == want).all(), (top_k, top_p, min_p)
