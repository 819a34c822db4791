"""The MLX model against the numpy float64 oracle, in both layouts."""

import mlx.core as mx
import numpy as np
import oracle
import pytest
from fixtures import Spec

from illada_mlx.cache import BlockCache
from illada_mlx.load import load

SPECS = {
    "illada-gqa-tied": Spec(),
    "illada-mha-untied-bias": Spec(kv_heads=4, tied=False, bias=True, theta=500000.0, seed=1),
    "llada-mha-untied": Spec(layout="llada", kv_heads=4, tied=False, theta=500000.0, seed=2),
    "llada-gqa-tied": Spec(layout="llada", kv_heads=1, tied=True, seed=3),
}


def rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(params=list(SPECS))
def loaded(request, ckpt_factory):
    spec = SPECS[request.param]
    d, params = ckpt_factory(spec)
    model, tok = load(str(d))
    return spec, params, model


def test_logits_match_float64_oracle(loaded):
    spec, params, model = loaded
    ids = np.random.default_rng(5).integers(0, spec.vocab, (3, 13))
    ref = oracle.forward(params, ids, spec.heads, spec.kv_heads, spec.theta, spec.eps)
    assert rel(model(mx.array(ids)), ref) <= 1e-4


def test_attention_is_bidirectional(loaded):
    spec, params, model = loaded
    ids = np.random.default_rng(6).integers(0, spec.vocab, (1, 8))
    a = np.array(model(mx.array(ids)))
    ids2 = ids.copy()
    ids2[0, -1] = (ids2[0, -1] + 1) % spec.vocab
    b = np.array(model(mx.array(ids2)))
    assert np.abs(a[0, 0] - b[0, 0]).max() > 1e-4  # the first position sees the last token


def test_left_padded_row_equals_unpadded_sequence(loaded):
    spec, params, model = loaded
    rng = np.random.default_rng(7)
    long, short = rng.integers(0, spec.vocab, 12), rng.integers(0, spec.vocab, 7)
    pad = 12 - 7
    ids = np.stack([long, np.concatenate([np.full(pad, 2), short])])
    valid = np.stack([np.ones(12), np.concatenate([np.zeros(pad), np.ones(7)])])
    out = np.array(model(mx.array(ids), attention_mask=mx.array(valid)), np.float64)
    assert np.isfinite(out).all()
    alone = oracle.forward(params, short[None], spec.heads, spec.kv_heads, spec.theta, spec.eps)[0]
    assert rel(out[1, pad:], alone) <= 1e-4
    assert rel(out[0], oracle.forward(params, long[None], spec.heads, spec.kv_heads, spec.theta, spec.eps)[0]) <= 1e-4


def test_logits_at_runs_head_on_selected_positions(loaded):
    spec, params, model = loaded
    ids = np.random.default_rng(8).integers(0, spec.vocab, (2, 10))
    full = np.array(model(mx.array(ids)))
    sel = np.array(model(mx.array(ids), logits_at=mx.array([1, 4, 9])))
    np.testing.assert_allclose(sel, full[:, [1, 4, 9]], rtol=1e-5, atol=1e-5)
    per_row = np.array(model(mx.array(ids), logits_at=mx.array([[0, 2], [3, 5]])))
    np.testing.assert_allclose(per_row[0], full[0, [0, 2]], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(per_row[1], full[1, [3, 5]], rtol=1e-5, atol=1e-5)


def test_cached_window_equals_full_forward_on_unchanged_canvas(loaded):
    """With the canvas unchanged since the refresh, a prefix or dual cached window is exact."""
    spec, params, model = loaded
    ids = mx.array(np.random.default_rng(9).integers(0, spec.vocab, (2, 16)))
    full = np.array(model(ids))
    for lo, hi in ((4, 16), (4, 8)):  # prefix (to the end), dual (a middle block)
        cache = BlockCache()
        model(ids, cache=cache)
        win = np.array(model(ids[:, lo:hi], cache=cache, offset=lo))
        np.testing.assert_allclose(win, full[:, lo:hi], rtol=1e-4, atol=1e-4)


def test_scattered_positions_forward_equals_full_forward(loaded):
    """The token cache's step: queries at any positions (unordered, repeated), their keys/values written
    over the cache's. Unchanged canvas: exact at those positions. Every position rerun with new tokens:
    the new canvas's forward (every key was overwritten before it was attended to)."""
    spec, params, model = loaded
    rng = np.random.default_rng(10)
    old = rng.integers(0, spec.vocab, (2, 12))
    new = old.copy()
    new[:, 5:9] = rng.integers(0, spec.vocab, (2, 4))
    valid = np.ones((2, 12))
    valid[1, :3] = 0  # a left-padded row
    kv = mx.array(valid)
    for ids, at in (
        (old, np.array([[7, 2, 7, 11], [10, 4, 5, 4]])),
        (new, np.stack([rng.permutation(12), rng.permutation(12)])),
    ):
        cache = BlockCache()
        model(mx.array(old), attention_mask=kv, cache=cache)
        toks = np.take_along_axis(ids, at, axis=1)
        out = np.array(model(mx.array(toks), attention_mask=kv, cache=cache, offset=mx.array(at)))
        for r in range(2):
            ref = oracle.forward(params, ids[r : r + 1, 3 * r :], spec.heads, spec.kv_heads, spec.theta, spec.eps)[0]
            keep = at[r] >= 3 * r  # a padded query's output is ignored
            assert rel(out[r][keep], ref[at[r][keep] - 3 * r]) <= 1e-4
