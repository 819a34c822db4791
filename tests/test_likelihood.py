"""Likelihood scoring against the official estimator re-derived in float64 (oracle.official_log_likelihood,
oracle.official_greedy), on tiny checkpoints of both layouts."""

import numpy as np
import oracle
import pytest
from fixtures import Spec

from illada_mlx.config import ContextError, IlladaError
from illada_mlx.likelihood import draw_masks, greedy_answers, greedy_check, log_likelihood, log_likelihoods
from illada_mlx.load import load

SPECS = {"illada": Spec(seed=31), "llada": Spec(layout="llada", kv_heads=4, tied=False, theta=500000.0, seed=32)}


@pytest.fixture(params=list(SPECS), scope="module")
def tiny(request, ckpt_factory):
    spec = SPECS[request.param]
    d, params = ckpt_factory(spec)
    model, _ = load(str(d))

    def logits_fn(x, kv):
        return oracle.forward(params, x, spec.heads, spec.kv_heads, spec.theta, spec.eps, key_valid=kv)

    return model, logits_fn


def pair(seed, plen, alen):
    rng = np.random.default_rng(seed)
    return rng.integers(8, 250, plen).tolist(), rng.integers(8, 250, alen).tolist()


def test_masks_follow_the_official_forward_process():
    # one group: a random start k, counts spread evenly over the rows and wrapped into [1, L]
    rng = np.random.default_rng(0)
    for L, rows in ((7, 4), (3, 8), (12, 12), (1, 5)):
        m = draw_masks(rng, rows, L)
        counts = m.sum(1)
        assert m.shape == (rows, L) and counts.min() >= 1 and counts.max() <= L
        k = counts[0]
        want = ((np.round(np.linspace(k, k + (rows - 1) * L / rows, rows)).astype(int) - 1) % L) + 1
        np.testing.assert_array_equal(counts, want)


@pytest.mark.parametrize("cfg", [0.0, 0.5])
def test_log_likelihood_equals_the_official_estimator(tiny, cfg):
    model, logits_fn = tiny
    mask = model.args.mask_token_id
    pairs = [pair(1, 6, 5), pair(2, 9, 3), pair(3, 4, 8)]  # unequal lengths share forwards, left-padded
    got = log_likelihoods(model, pairs, mc_num=8, batch_size=4, cfg_scale=cfg, seed=7)
    for (prompt, answer), s in zip(pairs, got):
        ref = oracle.official_log_likelihood(logits_fn, prompt, answer, s.masks, mask, cfg)
        assert abs(s.log_likelihood - ref) <= 1e-4 * abs(ref), (s.log_likelihood, ref)


def test_estimate_is_deterministic_for_a_seed_and_the_same_alone_or_batched(tiny):
    model, _ = tiny
    pairs = [pair(4, 5, 4), pair(5, 7, 6)]
    both = log_likelihoods(model, pairs, mc_num=8, batch_size=4, seed=3)
    alone = log_likelihoods(model, pairs[1:], mc_num=8, batch_size=4, seed=3)
    again = log_likelihoods(model, pairs, mc_num=8, batch_size=4, seed=3)
    assert [s.log_likelihood for s in both] == [s.log_likelihood for s in again]
    np.testing.assert_array_equal(alone[0].masks, both[1].masks)  # the same draws alone as batched
    assert abs(alone[0].log_likelihood - both[1].log_likelihood) <= 1e-5 * abs(both[1].log_likelihood)
    assert log_likelihood(model, *pairs[0], mc_num=8, batch_size=4, seed=3) == both[0].log_likelihood


@pytest.mark.parametrize("cfg", [0.0, 0.5])
def test_greedy_check_equals_the_official_suffix_greedy_prediction(tiny, cfg):
    model, logits_fn = tiny
    mask = model.args.mask_token_id
    items = [pair(6, 5, 4), pair(7, 8, 2), pair(8, 3, 6)]
    got = greedy_answers(model, [(p, len(a)) for p, a in items], cfg_scale=cfg)
    for (prompt, answer), g in zip(items, got):
        ref = oracle.official_greedy(logits_fn, prompt, len(answer), mask, cfg)
        assert g == ref
        assert greedy_check(model, prompt, ref, cfg_scale=cfg) is True
        assert greedy_check(model, prompt, [t + 1 for t in ref], cfg_scale=cfg) is False


def test_bad_requests_are_refused_in_one_line(tiny):
    model, _ = tiny
    prompt, answer = pair(9, 5, 4)
    with pytest.raises(IlladaError, match="multiple of batch_size"):
        log_likelihood(model, prompt, answer, mc_num=10, batch_size=4)
    with pytest.raises(IlladaError, match="empty answer"):
        log_likelihood(model, prompt, [], mc_num=4, batch_size=4)
    with pytest.raises(ContextError, match="positions"):
        log_likelihood(model, prompt, [9] * model.args.max_position_embeddings, mc_num=4, batch_size=4)
