"""Commit rules and schedules, model-free, against hand-worked cases and a numpy re-statement."""

import mlx.core as mx
import numpy as np
import pytest

from illada_mlx.kernels import candidates_reference
from illada_mlx.rules import commit_entropy, commit_error, commit_factor, commit_threshold, commit_topk, transfer_counts

NEG = -np.inf


def m(a):
    return mx.array(np.array(a, dtype=np.float32))


def test_official_schedule_spreads_the_remainder_first():
    assert transfer_counts(10, 4) == [3, 3, 2, 2]
    assert transfer_counts(32, 32) == [1] * 32
    assert transfer_counts(5, 8) == [1] * 5 + [0] * 3
    for n in range(0, 40):
        for s in range(1, 12):
            assert sum(transfer_counts(n, s)) == n


def test_topk_takes_the_k_most_confident_candidates_per_row():
    conf = m([[0.1, 0.9, NEG, 0.5], [0.3, NEG, 0.2, 0.8]])
    got = np.array(commit_topk(conf, mx.array([2, 1])))
    assert got.tolist() == [[False, True, False, True], [False, False, False, True]]


def test_threshold_commits_all_above_tau_and_at_least_the_best():
    conf = m([[0.95, 0.91, 0.5, NEG], [0.2, 0.3, NEG, NEG], [NEG, NEG, NEG, NEG]])
    got = np.array(commit_threshold(conf, 0.9))
    assert got.tolist() == [[True, True, False, False], [False, True, False, False], [False] * 4]


def _factor_np(c, f):
    c = np.sort(c[np.isfinite(c)])[::-1]
    n = 0
    while n < len(c) and (n + 2) * (1 - c[n]) < f:
        n += 1
    return max(n, 1) if len(c) else 0


def test_factor_rule_matches_its_definition():
    rng = np.random.default_rng(0)
    for _ in range(50):
        c = rng.uniform(0.3, 1.0, 16)
        c[rng.uniform(size=16) < 0.3] = NEG
        f = rng.uniform(0.5, 3)
        got = np.array(commit_factor(m([c]), f))[0]
        assert got.sum() == _factor_np(c, f)
        if got.sum():  # the committed ones are the most confident
            assert c[got].min() >= c[~got & np.isfinite(c)].max(initial=-1)


def test_entropy_rule_takes_low_entropy_first_within_gamma():
    conf = m([[0.9, 0.8, 0.7, NEG]])
    ent = m([[0.05, 0.3, 0.02, 0.0]])
    # ascending entropy: 0.02, 0.05, 0.3 -> running sums minus the newest: 0, 0.02, 0.07
    assert np.array(commit_entropy(conf, ent, 0.1)).tolist() == [[True, True, True, False]]
    assert np.array(commit_entropy(conf, ent, 0.05)).tolist() == [[True, False, True, False]]
    assert np.array(commit_entropy(conf, ent, 0.01)).tolist() == [[False, False, True, False]]
    assert np.array(commit_entropy(conf, ent, 0.0)).tolist() == [[False, False, True, False]]


def test_candidates_reference_against_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (2, 5, 50))
    x0, p, ent = candidates_reference(m(logits), 0.0, None, True)
    sm = np.exp(logits - logits.max(-1, keepdims=True))
    sm /= sm.sum(-1, keepdims=True)
    assert (np.array(x0) == logits.argmax(-1)).all()
    np.testing.assert_allclose(np.array(p), sm.max(-1), rtol=1e-5)
    np.testing.assert_allclose(np.array(ent), -(sm * np.log(sm)).sum(-1), rtol=1e-4, atol=1e-5)


def test_candidates_entropy_ignores_banned_ids():
    # the sampler bans the mask token (and EOS on request) with −inf logits: 0 · log 0 must count as 0,
    # not NaN (a NaN entropy makes every entropy-rule step commit only one token)
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, (2, 4, 30))
    logits[..., 5] = NEG
    logits[1, :, :3] = NEG
    _, _, ent = candidates_reference(m(logits), 0.0, None, True)
    sm = np.exp(logits - logits.max(-1, keepdims=True))
    sm /= sm.sum(-1, keepdims=True)
    want = -np.where(sm > 0, sm * np.log(np.where(sm > 0, sm, 1.0)), 0.0).sum(-1)
    np.testing.assert_allclose(np.array(ent), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("T", [0.5, 1.0])
def test_gumbel_choice_is_the_official_float64_formula(T):
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, (2, 6, 40))
    key = mx.random.key(9)
    x0, p, _ = candidates_reference(m(logits), T, key)
    u = np.array(mx.clip(mx.random.uniform(shape=logits.shape, key=key), 1e-20, 1.0), np.float64)
    official = (np.exp(logits) / (-np.log(u)) ** T).argmax(-1)
    assert (np.array(x0) == official).all()
    sm = np.exp(logits - logits.max(-1, keepdims=True))
    sm /= sm.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.array(p), np.take_along_axis(sm, official[..., None], -1)[..., 0], rtol=1e-5)


def _error_np(c, eps):
    """The error rule restated: the most confident candidates while Σ (1 − c) ≤ ε, at least one."""
    order = np.argsort(-c, kind="stable")
    took, spent = np.zeros(c.shape, dtype=bool), 0.0
    for j, i in enumerate(order):
        if not np.isfinite(c[i]):
            break
        spent += 1 - float(c[i])
        if j > 0 and spent > eps + 1e-6:
            break
        took[i] = True
    return took


@pytest.mark.parametrize("eps", [0.0, 0.05, 0.3, 2.0])
def test_error_rule_commits_while_the_summed_error_stays_under_the_bound(eps):
    rng = np.random.default_rng(7)
    c = 1 - rng.random((6, 12)) ** 3 * 0.4  # confidences in (0.6, 1], many near 1
    c[2, 5:] = NEG  # fewer candidates
    c[3] = NEG  # none at all
    got = np.array(commit_error(m(c), eps))
    want = np.stack([_error_np(row, eps) for row in c])
    assert got.tolist() == want.tolist()
    assert got[3].sum() == 0 and all(got[r].sum() >= 1 for r in (0, 1, 2, 4, 5))


def test_error_rule_worked_case():
    # 0.99 + 0.98 = 0.03 of error: both under 0.05; the third (0.9) would make 0.13
    conf = m([[0.9, 0.99, NEG, 0.98], [0.6, 0.7, NEG, NEG]])
    assert np.array(commit_error(conf, 0.05)).tolist() == [[False, True, False, True], [False, True, False, False]]


def test_stable_commits_take_the_settled_confident_candidates():
    # by hand: a candidate commits when it is confident enough and the previous step predicted it too
    from illada_mlx.rules import commit_stable

    conf = m([[0.97, 0.97, 0.5, NEG], [0.96, 0.99, 0.99, 0.99]])
    x0 = mx.array([[4, 5, 6, 7], [4, 5, 6, 7]])
    before = mx.array([[4, 9, 6, 7], [4, 5, -1, 7]])
    got = np.array(commit_stable(conf, x0, before, 0.96))
    assert got.tolist() == [[True, False, False, False], [True, True, False, True]]
