"""Each GPU kernel against the pure-MLX reference (skipped where its backend is absent: Metal on a Mac,
CUDA on MLX's CUDA backend). The reference itself is tested in test_rules.py."""

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
