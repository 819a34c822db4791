"""Fused candidates kernels (T = 0): per row of logits, argmax, its softmax probability and the entropy in
two passes over the vocabulary, one threadgroup per row, nothing (L, V)-sized written.

Metal (`mx.fast.metal_kernel`, used only when mx.metal.is_available()) and CUDA (`mx.fast.cuda_kernel`,
MLX's CUDA backend). The pure-MLX `kernels.candidates_reference` is the reference; tests/test_kernels.py
compares each available kernel with it. They are opt-in (ILLADA_MLX_KERNELS=1): on the CUDA backend the
kernel measured slower than MLX's own ops (bench/README.md); bench/device_check.sh measures them.
"""

from __future__ import annotations

import os
from functools import lru_cache

import mlx.core as mx

THREADS = 256

_METAL = """
    uint row = threadgroup_position_in_grid.x;
    uint tid = thread_position_in_threadgroup.x;
    uint lane = thread_index_in_simdgroup;
    uint warp = simdgroup_index_in_threadgroup;
    uint nw = (threads_per_threadgroup.x + 31) / 32;
    const device T* l = logits + size_t(row) * V;
    threadgroup float sm[32];
    threadgroup int sa[32];
    threadgroup float s0s[32];
    threadgroup float s1s[32];
    float m = -INFINITY;
    int arg = 0;
    for (uint i = tid; i < V; i += threads_per_threadgroup.x) {
        float v = float(l[i]);
        if (v > m) { m = v; arg = int(i); }
    }
    for (ushort off = 16; off > 0; off >>= 1) {
        float om = simd_shuffle_down(m, off);
        int oa = simd_shuffle_down(arg, off);
        if (om > m || (om == m && oa < arg)) { m = om; arg = oa; }
    }
    if (lane == 0) { sm[warp] = m; sa[warp] = arg; }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (warp == 0) {
        m = lane < nw ? sm[lane] : -INFINITY;
        arg = lane < nw ? sa[lane] : 0;
        for (ushort off = 16; off > 0; off >>= 1) {
            float om = simd_shuffle_down(m, off);
            int oa = simd_shuffle_down(arg, off);
            if (om > m || (om == m && oa < arg)) { m = om; arg = oa; }
        }
        if (lane == 0) { sm[0] = m; sa[0] = arg; }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    m = sm[0];
    arg = sa[0];
    float s0 = 0.0f, s1 = 0.0f;
    for (uint i = tid; i < V; i += threads_per_threadgroup.x) {
        float v = float(l[i]);
        float e = metal::exp(v - m);
        s0 += e;
        s1 += (e > 0.0f) ? e * v : 0.0f;
    }
    s0 = simd_sum(s0);
    s1 = simd_sum(s1);
    if (lane == 0) { s0s[warp] = s0; s1s[warp] = s1; }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid == 0) {
        float a0 = 0.0f, a1 = 0.0f;
        for (uint w = 0; w < nw; w++) { a0 += s0s[w]; a1 += s1s[w]; }
        x0[row] = arg;
        prob[row] = 1.0f / a0;
        ent[row] = metal::log(a0) + m - a1 / a0;
    }
"""

_CUDA = """
    int row = blockIdx.x;
    int tid = threadIdx.x;
    int lane = tid % 32, warp = tid / 32, nw = (blockDim.x + 31) / 32;
    const T* l = logits + (size_t)row * V;
    __shared__ float sm[32];
    __shared__ int sa[32];
    __shared__ float s0s[32];
    __shared__ float s1s[32];
    float m = -INFINITY;
    int arg = 0;
    for (int i = tid; i < V; i += blockDim.x) {
        float v = static_cast<float>(l[i]);
        if (v > m) { m = v; arg = i; }
    }
    for (int off = 16; off > 0; off >>= 1) {
        float om = __shfl_down_sync(0xffffffff, m, off);
        int oa = __shfl_down_sync(0xffffffff, arg, off);
        if (om > m || (om == m && oa < arg)) { m = om; arg = oa; }
    }
    if (lane == 0) { sm[warp] = m; sa[warp] = arg; }
    __syncthreads();
    if (warp == 0) {
        m = lane < nw ? sm[lane] : -INFINITY;
        arg = lane < nw ? sa[lane] : 0;
        for (int off = 16; off > 0; off >>= 1) {
            float om = __shfl_down_sync(0xffffffff, m, off);
            int oa = __shfl_down_sync(0xffffffff, arg, off);
            if (om > m || (om == m && oa < arg)) { m = om; arg = oa; }
        }
        if (lane == 0) { sm[0] = m; sa[0] = arg; }
    }
    __syncthreads();
    m = sm[0];
    arg = sa[0];
    float s0 = 0.0f, s1 = 0.0f;
    for (int i = tid; i < V; i += blockDim.x) {
        float v = static_cast<float>(l[i]);
        float e = expf(v - m);
        s0 += e;
        s1 += (e > 0.0f) ? e * v : 0.0f;
    }
    for (int off = 16; off > 0; off >>= 1) {
        s0 += __shfl_down_sync(0xffffffff, s0, off);
        s1 += __shfl_down_sync(0xffffffff, s1, off);
    }
    if (lane == 0) { s0s[warp] = s0; s1s[warp] = s1; }
    __syncthreads();
    if (tid == 0) {
        float a0 = 0.0f, a1 = 0.0f;
        for (int w = 0; w < nw; w++) { a0 += s0s[w]; a1 += s1s[w]; }
        x0[row] = arg;
        prob[row] = 1.0f / a0;
        ent[row] = logf(a0) + m - a1 / a0;
    }
"""


def backend() -> str | None:
    """'metal' or 'cuda' when that GPU backend is live, else None."""
    if mx.metal.is_available():
        return "metal"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "cuda"
    return None


@lru_cache(maxsize=None)
def _kernel(kind: str):
    names = dict(input_names=["logits"], output_names=["x0", "prob", "ent"])
    if kind == "metal":
        return mx.fast.metal_kernel(name="illada_candidates", source=_METAL, **names)
    return mx.fast.cuda_kernel(name="illada_candidates", source=_CUDA, **names)


def candidates_kernel(logits: mx.array, kind: str):
    """(x0, p(x0), entropy) at T = 0 with the `kind` kernel; logits (..., V), float32/16 or bfloat16."""
    shape, V = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, V)
    n = flat.shape[0]
    x0, p, ent = _kernel(kind)(
        inputs=[flat],
        template=[("T", flat.dtype), ("V", V)],
        grid=(n * THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(n,), (n,), (n,)],
        output_dtypes=[mx.int32, mx.float32, mx.float32],
    )
    return x0.reshape(shape), p.reshape(shape), ent.reshape(shape)


@lru_cache(maxsize=None)
def enabled_backend() -> str | None:
    """Decided once per process: the opt-in flag and a live GPU backend."""
    return backend() if os.environ.get("ILLADA_MLX_KERNELS") == "1" else None


def fused_candidates(logits, temperature, want_entropy):
    """The kernel's result when enabled and applicable (T = 0 on a live GPU backend), else None."""
    kind = enabled_backend()
    if temperature > 0 or kind is None:
        return None
    x0, p, ent = candidates_kernel(logits, kind)
    return x0, p, ent if want_entropy else None
