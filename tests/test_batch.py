"""Continuous batching (batch.py): rows joining at block boundaries decode as they do alone (T = 0)."""

import numpy as np
import pytest
from fixtures import Spec

from illada_mlx.batch import Batch, LogprobTracker, Row, batch_key
from illada_mlx.decode import DecodeSpec, decode, run
from illada_mlx.load import load


@pytest.fixture(scope="module")
def tiny(ckpt_factory):
    d, _ = ckpt_factory(Spec(seed=21))
    return load(str(d))[0]


def spec_for(model, **kw):
    a = model.args
    base = dict(
        mask_id=a.mask_token_id,
        eos_id=a.eos_token_id,
        eot_id=a.eot_token_id,
        pad_id=a.pad_token_id,
        canvas="growing",
        block_length=8,
        steps_per_block=8,
        logits_eos_inf=True,
    )
    return DecodeSpec(**{**base, **kw})


def alone(model, ids, spec, budget):
    from dataclasses import replace

    return run(decode(model, [ids], replace(spec, max_tokens=budget))).tokens[0]


def serve(model, spec, arrivals):
    """arrivals: {block number: [(name, ids, budget)]}; rows join when that block starts. Returns tokens."""
    batch, got, t = Batch(model, spec), {}, 0
    while t <= max(arrivals) or batch.size:
        for name, ids, budget in arrivals.get(t, []):
            assert batch.fits(len(ids), budget)
            batch.add(Row(name, ids, budget))
            got[name] = []
        for row, toks, reason, _ in batch.run_block():
            got[row.handle] += toks
        t += 1
    return got


@pytest.mark.parametrize(
    "kw",
    [
        dict(cache="none", rule="schedule"),
        dict(cache="prefix", rule="threshold"),
        dict(cache="dual", rule="threshold", steps_per_block=4),
        dict(cache="token", rule="threshold", steps_per_block=6),
        dict(cache="prefix", rule="threshold", block_refresh="full"),
    ],
)
def test_rows_joining_later_decode_as_alone(tiny, kw):
    spec = spec_for(tiny, eot_id=None, **kw)  # no row stops early: every join meets running rows
    rng = np.random.default_rng(3)
    p = {n: rng.integers(8, 250, size).tolist() for n, size in (("a", 9), ("b", 5), ("c", 12), ("d", 7))}
    arrivals = {0: [("a", p["a"], 24), ("b", p["b"], 16)], 1: [("c", p["c"], 16)], 2: [("d", p["d"], 8)]}
    got = serve(tiny, spec, arrivals)
    for t, rows in arrivals.items():
        for name, ids, budget in rows:
            assert got[name] == alone(tiny, ids, spec, budget), (name, kw)


def test_a_row_that_does_not_fit_waits(tiny):
    b = Batch(tiny, spec_for(tiny, eot_id=None))  # it never stops: it runs to its budget
    b.add(Row("a", [9] * 4, 24))
    b.run_block()
    assert not b.fits(20, 8)  # its prompt is longer than the canvas so far
    assert not b.fits(4, tiny.args.max_position_embeddings)


def test_removed_rows_leave_and_the_others_go_on(tiny):
    spec = spec_for(tiny, cache="prefix", rule="threshold")
    ids = [[11, 12, 13, 14], [21, 22, 23]]
    b = Batch(tiny, spec)
    b.add(Row("x", ids[0], 24))
    b.add(Row("y", ids[1], 24))
    toks = {"x": [], "y": []}
    for row, t, _, _ in b.run_block():
        toks[row.handle] += t
    assert [r.handle for r in b.remove({"x"})] == ["x"]
    while b.size:
        for row, t, _, _ in b.run_block():
            toks[row.handle] += t
    assert toks["y"] == alone(tiny, ids[1], spec, 24)


def test_logprobs_are_the_committed_tokens_log_softmax(tiny):
    import mlx.core as mx

    spec = spec_for(tiny, cache="none", rule="schedule", steps_per_block=8)
    b = Batch(tiny, spec)
    ids = [30, 31, 32, 33]
    b.add(Row("a", ids, 8))
    ((row, toks, _, lp),) = b.run_block(logprobs=LogprobTracker(2))
    assert len(lp.token) == len(toks) and all(v <= 0 for v in lp.token)
    assert all(t in top_ids or v < top[-1] + 1e-6 for t, v, top_ids, top in zip(toks, lp.token, lp.top_ids, lp.top))
    # at T = 0 each committed token is the argmax at its step: it is its position's top candidate
    assert [ids_[0] for ids_ in lp.top_ids] == toks and np.allclose([t[0] for t in lp.top], lp.token, atol=1e-5)
    del mx


def test_batch_key_separates_what_cannot_share_a_batch(tiny):
    s = spec_for(tiny, max_tokens=16)
    from dataclasses import replace

    assert batch_key(s) == batch_key(replace(s, seed=3, stop=("x",), max_tokens=32))
    assert batch_key(replace(s, threshold=0.5)) != batch_key(s)
    for other in (
        replace(s, canvas="fixed"),
        replace(s, max_tokens=12),
        replace(s, temperature=0.5, seed=1),
        replace(s, think_boost=(1.0, 1.0)),
    ):
        assert batch_key(other) is None


def serve_leaving(model, spec, arrivals, leaves):
    """serve(), with rows that leave mid-block: leaves {name: (block number, step)}, the row goes after that
    step of that block. Returns (tokens, how each row ended, rows in each step's Step event)."""
    batch, got, ended, shapes, t = Batch(model, spec), {}, {}, [], 0
    at = {"step": None}
    while t <= max(arrivals) or batch.size:
        for name, ids, budget in arrivals.get(t, []):
            batch.add(Row(name, ids, budget))
            got[name] = []

        def on_step(ev, t=t):
            at["step"] = (t, ev.step)
            shapes.append((t, ev.step, ev.canvas.shape[0]))

        out = batch.run_block(on_step=on_step, leave=lambda r: leaves.get(r.handle) == at["step"])
        for row, toks, reason, _ in out:
            got[row.handle] += toks
            ended[row.handle] = reason
        t += 1
    return got, ended, shapes


@pytest.mark.parametrize(
    "kw",
    [
        dict(cache="none", rule="schedule"),
        dict(cache="prefix", rule="threshold"),
        dict(cache="dual", rule="threshold", steps_per_block=4),
        dict(cache="token", rule="threshold", steps_per_block=6),
        dict(cache="prefix", rule="threshold", block_refresh="drift"),
    ],
)
def test_a_row_that_leaves_mid_block_goes_at_that_step_and_the_others_are_unchanged(tiny, kw):
    # the oracle: the same batch run without the leaving rows at all, and each row decoded alone
    spec = spec_for(tiny, eot_id=None, **kw)  # no row stops early
    rng = np.random.default_rng(5)
    p = {n: rng.integers(8, 250, size).tolist() for n, size in (("a", 6), ("b", 4), ("c", 11), ("d", 5))}
    arrivals = {0: [("a", p["a"], 24), ("b", p["b"], 16), ("c", p["c"], 24)], 1: [("d", p["d"], 16)]}
    leaves = {"c": (1, 1), "d": (1, 0)}  # c after step 1 of the second block; d at its join block's first step
    got, ended, shapes = serve_leaving(tiny, spec, arrivals, leaves)
    without = serve(tiny, spec, {0: [("a", p["a"], 24), ("b", p["b"], 16)]})
    assert got["a"] == without["a"] == alone(tiny, p["a"], spec, 24)
    assert got["b"] == without["b"] == alone(tiny, p["b"], spec, 16)
    assert ended["c"] == ended["d"] == "cancelled" and got["d"] == []
    assert got["c"] == alone(tiny, p["c"], spec, 8)  # its first block, nothing of the block it left in
    assert ended["a"] == ended["b"] == "length"
    rows = {(b, s): n for b, s, n in shapes}
    assert rows[(1, 0)] == 4 and rows[(1, 1)] == 3 and rows[(1, 2)] == 2  # one row fewer at each next step


def test_when_every_row_leaves_the_block_ends_at_that_step(tiny):
    spec = spec_for(tiny, eot_id=None, cache="prefix", rule="threshold")
    got, ended, shapes = serve_leaving(
        tiny, spec, {0: [("a", [5, 6, 7], 24), ("b", [8, 9], 24)]}, {"a": (0, 2), "b": (0, 2)}
    )
    assert ended == {"a": "cancelled", "b": "cancelled"} and got == {"a": [], "b": []}
    assert [s for _, s, _ in shapes] == [0, 1, 2]  # no step after the one they left at


def test_the_block_cache_owns_its_operations():
    # what callers used to do by hand: the window a forward attends over, the prefix a refresh skips, the
    # settled mark, and one cache of two caches' rows (a batch's running rows and the rows joining it)
    import mlx.core as mx

    from illada_mlx.cache import BlockCache

    a, b = BlockCache(), BlockCache()
    a.update(0, mx.ones((2, 1, 4, 3)), mx.ones((2, 1, 4, 3)), 0)
    a.record(mx.full((2, 4), 7, dtype=mx.int32), 0)
    b.update(0, mx.full((1, 1, 6, 3), 2.0), mx.full((1, 1, 6, 3), 2.0), 0)
    b.record(mx.full((1, 6), 9, dtype=mx.int32), 0)
    b.skip(3)
    assert b.take_reuse() == 3 and b.take_reuse() == 0
    a.window(4)
    a.settle(4)
    assert (a.length, a.settled) == (4, 4)
    m = a.merge(b)
    assert m.keys[0].shape[0] == 3 and m.keys[0].shape[2] == m.capacity == max(a.capacity, b.capacity)
    assert m.length == 6 and m.settled == 0 and m.reuse == 0
    assert m.ids[:2, :4].tolist() == [[7] * 4] * 2 and m.ids[2, :6].tolist() == [9] * 6
    assert m.ids[0, 4:6].tolist() == [-1, -1]  # a's rows padded where nothing was written
