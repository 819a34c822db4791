"""The sampler against the official algorithm re-derived in float64 (oracle.official_generate), plus the
variable-length, fast-path and argument-checking behaviour on a scripted model."""

from dataclasses import replace

import mlx.core as mx
import numpy as np
import oracle
import pytest
from fixtures import Spec

from illada_mlx.config import IlladaError, ModelArgs
from illada_mlx.decode import BlockDone, Step, generate, var_generate
from illada_mlx.load import load

ILLADA = Spec(seed=21)
LLADA = Spec(layout="llada", kv_heads=4, tied=False, theta=500000.0, seed=22)


@pytest.fixture(params=["illada", "llada"])
def tiny(request, ckpt_factory):
    spec = ILLADA if request.param == "illada" else LLADA
    d, params = ckpt_factory(spec)
    model, tok = load(str(d))

    def logits_fn(x, kv):
        return oracle.forward(params, x, spec.heads, spec.kv_heads, spec.theta, spec.eps, key_valid=kv)

    return model, tok, logits_fn, model.args.mask_token_id


def prompts(n, length, seed):
    return np.random.default_rng(seed).integers(8, 250, (n, length))


def replay_uniforms(seed, prompt_len, block_length, steps_per_block, n_steps, rows, vocab, canvas_len):
    """The sampler's documented random stream, laid out on the canvas for the oracle."""
    key = mx.random.key(seed)
    remask, gumbel = {}, {}
    for step in range(n_steps):
        key, sub = mx.random.split(key)
        k_r, k_g = mx.random.split(sub)
        lo = prompt_len + (step // steps_per_block) * block_length
        r = np.full((rows, canvas_len), 0.5)
        r[:, lo : lo + block_length] = np.array(mx.random.uniform(shape=(rows, block_length), key=k_r))
        g = np.full((rows, canvas_len, vocab), 0.5)
        u = mx.clip(mx.random.uniform(shape=(rows, block_length, vocab), key=k_g), 1e-20, 1.0)
        g[:, lo : lo + block_length] = np.array(u)
        remask[step], gumbel[step] = r, g

    def uniforms(step, kind, shape):
        return (remask if kind == "remask" else gumbel)[step]

    return uniforms


@pytest.mark.parametrize("G,B,S", [(16, 8, 16), (16, 4, 8), (12, 12, 6), (24, 8, 6), (16, 16, 32), (8, 1, 8)])
def test_exact_mode_matches_official_algorithm(tiny, G, B, S):
    # (8, 1, 8): 1-token blocks, one step each: strictly left to right (bench/quality.py's AR-order row)
    model, _, logits_fn, mask = tiny
    for seed in range(3):
        p = prompts(3, 5 + seed, seed)
        ref = oracle.official_generate(logits_fn, p, S, G, B, mask)
        out = generate(model, mx.array(p), steps=S, gen_length=G, block_length=B, mask_id=mask)
        np.testing.assert_array_equal(np.array(out), ref)


def test_batch_with_left_padding_matches_official(tiny):
    model, _, logits_fn, mask = tiny
    rows = [list(prompts(1, n, n)[0]) for n in (7, 3, 5)]
    P = 7
    padded = np.array([[2] * (P - len(r)) + r for r in rows])
    valid = np.array([[0] * (P - len(r)) + [1] * len(r) for r in rows])
    ref = oracle.official_generate(logits_fn, padded, 8, 16, 8, mask, key_valid=valid)
    out = np.array(
        generate(
            model,
            mx.array(padded),
            attention_mask=mx.array(valid),
            steps=8,
            gen_length=16,
            block_length=8,
            mask_id=mask,
        )
    )
    np.testing.assert_array_equal(out[:, P:], ref[:, P:])
    # and every padded row equals that prompt decoded alone
    for j, r in enumerate(rows):
        alone = np.array(generate(model, [r], steps=8, gen_length=16, block_length=8, mask_id=mask))
        np.testing.assert_array_equal(out[j, P:], alone[0, len(r) :])


@pytest.mark.parametrize("with_mask", [False, True])
def test_cfg_matches_official(tiny, with_mask):
    model, _, logits_fn, mask = tiny
    p = prompts(2, 6, 3)
    valid = np.array([[1] * 6, [0, 0, 1, 1, 1, 1]]) if with_mask else None
    # a mild scale: stronger guidance saturates fp32 probabilities at exactly 1.0 (ties the official
    # fp32 code breaks arbitrarily too), which a float64 oracle would order differently
    ref = oracle.official_generate(logits_fn, p, 8, 16, 8, mask, cfg_scale=0.3, key_valid=valid)
    out = generate(
        model,
        mx.array(p),
        steps=8,
        gen_length=16,
        block_length=8,
        mask_id=mask,
        cfg_scale=0.3,
        attention_mask=None if valid is None else mx.array(valid),
    )
    got = np.array(out)
    np.testing.assert_array_equal(got[:, 6:], ref[:, 6:])


@pytest.mark.parametrize("remasking,T", [("random", 0.0), ("low_confidence", 0.7), ("random", 1.0)])
def test_random_remasking_and_gumbel_match_official_with_fixed_key(tiny, remasking, T):
    model, _, logits_fn, mask = tiny
    G, B, S, P = 16, 8, 8, 5
    p = prompts(2, P, 4)
    uni = replay_uniforms(123, P, B, S // (G // B), S, 2, model.args.vocab_size, P + G)
    ref = oracle.official_generate(logits_fn, p, S, G, B, mask, temperature=T, remasking=remasking, uniforms=uni)
    out = generate(
        model,
        mx.array(p),
        steps=S,
        gen_length=G,
        block_length=B,
        mask_id=mask,
        temperature=T,
        remasking=remasking,
        seed=123,
        logits_at="block",
    )
    np.testing.assert_array_equal(np.array(out), ref)


def test_threshold_one_without_cache_is_exact_mode(tiny):
    model, _, _, mask = tiny
    p = mx.array(prompts(2, 6, 5))
    exact = generate(model, p, steps=16, gen_length=16, block_length=8, mask_id=mask)
    fast = generate(model, p, steps=16, gen_length=16, block_length=8, mask_id=mask, rule="threshold", threshold=1.0)
    np.testing.assert_array_equal(np.array(fast), np.array(exact))


def test_entropy_rule_with_a_loose_bound_fills_each_block_in_one_forward(tiny):
    # every masked position has a finite entropy even though the mask token is banned, so a bound
    # larger than any sum commits the whole block at once, to the step's argmax
    model, _, logits_fn, mask = tiny
    p = prompts(2, 6, 7)
    out, stats = generate(
        model,
        mx.array(p),
        steps=16,
        gen_length=16,
        block_length=8,
        mask_id=mask,
        rule="entropy",
        entropy_gamma=1e9,
        return_stats=True,
    )
    assert stats.nfe == 2
    ref = oracle.official_generate(logits_fn, p, 2, 16, 8, mask)  # one step per block takes all 8
    np.testing.assert_array_equal(np.array(out), ref)


@pytest.mark.parametrize("cache", ["prefix", "dual", "token"])
def test_cache_refreshed_every_step_is_identical_to_no_cache(tiny, cache):
    model, _, _, mask = tiny
    p = mx.array(prompts(2, 6, 6))
    ref = generate(model, p, steps=12, gen_length=24, block_length=8, mask_id=mask)
    out = generate(model, p, steps=12, gen_length=24, block_length=8, mask_id=mask, cache=cache, refresh_every=1)
    np.testing.assert_array_equal(np.array(out), np.array(ref))


@pytest.mark.parametrize("cache", ["prefix", "dual", "token"])
def test_cache_processes_fewer_tokens(tiny, cache):
    model, _, _, mask = tiny
    p = mx.array(prompts(1, 6, 7))
    _, none = generate(model, p, steps=16, gen_length=32, block_length=8, mask_id=mask, return_stats=True)
    out, st = generate(model, p, steps=16, gen_length=32, block_length=8, mask_id=mask, cache=cache, return_stats=True)
    assert st.nfe == none.nfe and st.processed < none.processed
    assert (np.array(out)[:, 6:] != mask).all()


def test_cache_kept_across_calls_reuses_the_common_prefix(tiny):
    """Chat turns: the second prompt extends the first; its first refresh runs only the new part."""
    from illada_mlx.cache import BlockCache
    from illada_mlx.decode import decode, run
    from illada_mlx.spec import DecodeSpec

    model, _, _, mask = tiny
    spec = DecodeSpec(mask_id=mask, canvas="growing", max_tokens=16, steps_per_block=4, block_length=8, cache="prefix")
    turn1 = prompts(1, 10, 9)[0].tolist()
    cache = BlockCache(turn_delay=0)
    g1 = run(decode(model, [turn1], spec, cache=cache))
    turn2 = turn1 + g1.tokens[0] + [40, 41, 42]
    fresh = run(decode(model, [turn2], spec))
    reused = run(decode(model, [turn2], spec, cache=cache))
    # the first turn's prompt and its reply come from the cache, up to the reply's last block (whose
    # keys/values were last written before its last commits): from there on this turn recomputes
    saved = len(turn1) + len(g1.tokens[0]) - 8
    assert fresh.stats.processed - reused.stats.processed >= saved
    assert len(reused.tokens[0]) == 16 and mask not in reused.tokens[0]


@pytest.mark.parametrize("mode", ["prefix", "dual", "token"])
def test_next_turn_reuses_only_final_states(tiny, mode):
    """Cross-turn reuse stops where the cached states stop being final. turn_delay=0: every reply block but
    the last was recomputed with its final tokens at the next block start; the last one's keys/values were
    written while it was being committed (under the token cache even for tokens that match the next
    prompt). turn_delay=1 (the default): the last turn's prompt and reply were computed as the last turn,
    followed by masks, so the next call recomputes them and reuses what the call before it computed."""
    from illada_mlx.cache import BlockCache
    from illada_mlx.decode import decode, run
    from illada_mlx.spec import DecodeSpec

    model, _, _, mask = tiny
    spec = DecodeSpec(mask_id=mask, canvas="growing", max_tokens=24, steps_per_block=4, block_length=8, cache=mode)
    turn1 = prompts(1, 10, 9)[0].tolist()
    now, delayed = BlockCache(turn_delay=0), BlockCache()
    reply1 = run(decode(model, [turn1], spec, cache=now)).tokens[0]
    assert run(decode(model, [turn1], spec, cache=delayed)).tokens[0] == reply1
    assert len(reply1) == 24  # three blocks
    turn2 = turn1 + reply1 + [40, 41, 42]
    now.plan_reuse(mx.array([turn2]), len(turn2) - 1)
    assert now.reuse == len(turn1) + 16  # the prompt and the reply's first two blocks
    delayed.plan_reuse(mx.array([turn2]), len(turn2) - 1)
    assert delayed.reuse == 0  # the only turn so far is the last one: all of it is recomputed
    # a prompt that leaves the first turn earlier reuses only their common prefix
    now.plan_reuse(mx.array([turn1[:5] + [40] * 30]), 34)
    assert now.reuse == 5
    # the third turn reuses the first turn's prompt and reply, as the second call recomputed them
    reply2 = run(decode(model, [turn2], spec, cache=delayed)).tokens[0]
    turn3 = turn2 + reply2 + [43, 44]
    delayed.plan_reuse(mx.array([turn3]), len(turn3) - 1)
    assert delayed.reuse == len(turn1) + len(reply1)


def test_step_and_block_events_stream(tiny):
    model, _, _, mask = tiny
    events = []
    out = generate(
        model, mx.array(prompts(1, 4, 8)), steps=8, gen_length=16, block_length=8, mask_id=mask, on_event=events.append
    )
    steps = [e for e in events if isinstance(e, Step)]
    blocks = [e for e in events if isinstance(e, BlockDone)]
    assert len(steps) == 8 and len(blocks) == 2
    assert int(np.array(steps[0].committed).sum()) == 2  # 8 masks over 4 steps: 2 per step
    assert np.array_equal(np.array(steps[-1].canvas), np.array(out))


# ------------------------------------------------------------------------------- a scripted model
EOS, MASK, THINK = 2, 5, 7


class Scripted:
    """Predicts script[position] with logit margin; a real Model's call signature, cache ignored.
    A row's script is chosen by its first token (11 -> script 0, 12 -> script 1, ...)."""

    def __init__(self, script, vocab=64, margin=8.0, think_margin=None):
        self.args = ModelArgs(
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=1,
            num_key_value_heads=1,
            intermediate_size=8,
            vocab_size=vocab,
            max_position_embeddings=512,
            mask_token_id=MASK,
            eos_token_id=EOS,
        )
        self.script, self.vocab, self.margin, self.think_margin = script, vocab, margin, think_margin
        self.calls = []

    def __call__(self, ids, attention_mask=None, logits_at=None, cache=None, offset=0):
        B, L = ids.shape
        self.calls.append((B, L))
        first = np.array(ids[:, 0]) if offset == 0 else self.first
        self.first = first
        pos = np.arange(offset, offset + L)
        at = np.array(logits_at) if logits_at is not None else np.broadcast_to(np.arange(L), (B, L))
        at = np.broadcast_to(at, (B, at.shape[-1]))
        out = np.zeros((B, at.shape[1], self.vocab), np.float32)
        for b in range(B):
            for k, i in enumerate(at[b]):
                row = self.script[(int(first[b]) - 11) % len(self.script)]
                p = pos[i]
                out[b, k, row[p] if p < len(row) else 9] = self.margin - 0.01 * (p % 7)
                if self.think_margin is not None:
                    out[b, k, THINK] = self.margin - self.think_margin
        return mx.array(out)


def script_with_eos(prompt_len, eos_at, n=300, tok=40):
    s = [tok] * n
    s[prompt_len + eos_at] = EOS
    return s


def test_variable_length_stops_at_first_eos_and_runs_no_block_after():
    P = 4
    model = Scripted([script_with_eos(P, 40)])
    events = []
    g = var_generate(model, [[11] * P], steps=8, max_tokens=256, block_length=32, on_event=events.append)
    assert g.tokens[0] == [40] * 40 and g.finish_reasons == ["stop"]
    assert len([e for e in events if isinstance(e, BlockDone)]) == 2  # EOS in block 1: block 2 never runs
    assert g.stats.nfe == 16 and len(model.calls) == 16


def test_variable_length_budget_is_respected():
    P = 3
    model = Scripted([[40] * 300])
    g = var_generate(model, [[11] * P], steps=4, max_tokens=70, block_length=32)
    assert len(g.tokens[0]) == 70 and g.finish_reasons == ["length"]
    assert max(L for _, L in model.calls) == P + 70  # the canvas never grew past the budget


def test_variable_length_batch_stops_rows_independently():
    P = 4
    model = Scripted([script_with_eos(P, 5), script_with_eos(P, 70)])
    g = var_generate(model, [[11] * P, [12] * P], steps=4, max_tokens=256, block_length=32)
    assert [len(t) for t in g.tokens] == [5, 70]
    assert g.finish_reasons == ["stop", "stop"]
    batch_sizes = [B for B, _ in model.calls]
    assert batch_sizes[:4] == [2] * 4 and set(batch_sizes[4:]) == {1}  # row 0 left after block 0


def test_variable_length_stop_string_cuts_text(ckpt_factory):
    d, _ = ckpt_factory(ILLADA)
    _, tok = load(str(d))
    P = 3
    text = "the answer is 42.\nUser: more"
    ids = tok.encode(text, add_special_tokens=False)
    script = [9] * P + ids + [40] * 200
    model = Scripted([script], vocab=300)
    events = []
    g = var_generate(
        model,
        [[11] * P],
        steps=4,
        max_tokens=256,
        block_length=8,
        stop=["\nUser:"],
        tokenizer=tok,
        on_event=events.append,
    )
    assert g.texts == ["the answer is 42."]
    stop_block = (text.index("\nUser:") + len("\nUser:") - 1) // 8
    assert len([e for e in events if isinstance(e, BlockDone)]) == stop_block + 1


def test_end_of_thinking_boost_forces_think_close(ckpt_factory):
    P = 4
    base = Scripted([[40] * 300], think_margin=5.0)
    g = var_generate(base, [[11] * P], steps=8, max_tokens=128, block_length=32, mask_id=MASK)
    assert THINK not in g.tokens[0]
    boosted = Scripted([[40] * 300], think_margin=5.0)
    g = var_generate(
        boosted, [[11] * P], steps=8, max_tokens=128, block_length=32, think_boost=(100.0, 3.0), think_token=THINK
    )
    # progress 32/128 → boost 1.6 < 5; 64/128 → 12.5 > 5: block 2 opens with </think>, and only once
    assert g.tokens[0].index(THINK) == 64 and g.tokens[0].count(THINK) == 1


# ------------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(gen_length=20, block_length=8), "multiple"),
        (dict(gen_length=32, block_length=8, steps=6), "divisible"),
        (dict(gen_length=512, block_length=32, steps=16), "positions"),
        (dict(mask_id=999), "outside"),
        (dict(remasking="lowest"), "remasking"),
        (dict(cache="full"), "cache"),
        (dict(rule="threshold", threshold=1.5), "threshold"),
    ],
)
def test_invalid_arguments_fail_before_any_work(kw, needle):
    model = Scripted([[40] * 600])
    args = dict(steps=8, gen_length=32, block_length=8)
    args.update(kw)
    with pytest.raises(IlladaError, match=needle):
        generate(model, [[11] * 10], **args)
    assert model.calls == []


def test_missing_mask_id_is_refused():
    model = Scripted([[40] * 100])
    model.args.mask_token_id = None
    with pytest.raises(IlladaError, match="mask"):
        var_generate(model, [[11] * 4], max_tokens=32)
    assert model.calls == []


@pytest.mark.parametrize("mode", ["exact", "variable"])
def test_default_budget_is_cut_to_the_context_and_an_asked_one_refused(tiny, mode):
    from fixtures import reply

    from illada_mlx.config import ContextError

    model, tok, _, _ = tiny
    ids = prompts(1, model.args.max_position_embeddings - 62, 8)[0].tolist()  # 62 positions left
    s = dict(mode=mode, block_length=8, steps_per_block=1)
    _, toks, r = reply(model, tok, ids, **s)
    # the fixed canvas's 128-token default is cut to whole blocks (56), the growing one's to the room (62)
    assert r.spec.max_tokens == (56 if mode == "exact" else 62) and len(toks) <= 62
    if mode == "exact":  # one forward per block here
        assert r.stats.nfe == 7
    with pytest.raises(ContextError, match="positions"):
        reply(model, tok, ids, max_tokens=63, **s)


def test_budget_rule():
    # spec.fit_budget, the one rule every entry point goes through (make_spec): an asked-for budget is kept
    # (a fixed canvas in whole blocks) and refused if it does not fit; a default one is cut to the room left
    from illada_mlx.config import ContextError
    from illada_mlx.spec import fit_budget

    assert fit_budget(64, 1024, 10, 1024, 32, fixed=False) == 64
    assert fit_budget(40, 128, 10, 1024, 32, fixed=True) == 64  # rounded up to whole blocks
    assert fit_budget(None, 1024, 100, 1024, 32, fixed=False) == 924
    assert fit_budget(None, 128, 1000, 1024, 8, fixed=True) == 24
    assert fit_budget(None, 128, 10, 1024, 32, fixed=True) == 128
    with pytest.raises(ContextError, match="max_tokens \\(1000"):
        fit_budget(1000, 128, 100, 1024, 8, fixed=False)
    with pytest.raises(ContextError, match="leaves no room"):
        fit_budget(None, 128, 1020, 1024, 8, fixed=True)


def test_make_spec_defaults_per_model_kind(tiny):
    # a fixed canvas without a budget is the official 128 tokens on either kind; the growing one is iLLaDA's
    # 1024 (no chat template) cut to the context; a model without its own defaults runs the fast mode on
    # either layout
    from illada_mlx.spec import make_spec

    model, tok, _, _ = tiny
    default = make_spec(model, tok, 6)
    assert (default.mode, default.canvas, default.max_tokens) == ("fast", "growing", 512 - 6)
    assert (default.rule, default.threshold, default.block_refresh, default.eos_fill) == (
        "threshold",
        0.9,
        "drift",
        True,
    )
    assert make_spec(model, tok, 6, mode="exact").max_tokens == 128
    fixed = make_spec(model, tok, 6, mode="fast_fixed")
    assert (fixed.max_tokens, fixed.rule, fixed.cache) == (128, "threshold", "dual")
    assert make_spec(model, tok, 6, mode="fast", cache="none").cache == "none"
    with pytest.raises(IlladaError, match="unknown decode option 'warp'"):
        make_spec(model, tok, 6, warp=1)


# ------------------------------------------------------------------------------- the block cache
def _growing(mask, **kw):
    from illada_mlx.spec import DecodeSpec

    return DecodeSpec(mask_id=mask, **{"canvas": "growing", "block_length": 8, "steps_per_block": 4, **kw})


@pytest.mark.parametrize(
    "cache,refresh,full_every",
    [
        ("prefix", "window", 0),
        ("prefix", "full", 0),
        ("dual", "window", 2),
        ("prefix", "window", 3),
        ("token", "window", 0),
    ],
)
def test_processed_tokens_follow_the_refresh_policy(tiny, cache, refresh, full_every):
    # the growing canvas, P = 6, blocks of 8, 4 steps each, 5 blocks: block 0 starts with the whole canvas;
    # a later block start runs the finished block again and the new one (window) or the whole canvas (full,
    # and every `full_every` blocks under window); a step runs the block
    from illada_mlx.decode import decode, run

    model, _, _, mask = tiny
    P, B, S, n = 6, 8, 4, 5
    spec = _growing(
        mask, max_tokens=n * B, cache=cache, block_refresh=refresh, full_refresh_every=full_every, logits_eos_inf=True
    )
    g = run(decode(model, [prompts(1, P, 11)[0].tolist()], spec))
    full = [b == 0 or refresh == "full" or (full_every and b % full_every == 0) for b in range(n)]
    # a step runs the block; the token cache's step runs the positions the step before it ran: the whole
    # block after the block start, then the 6 and 4 masks the schedule (2 a step) left at the two before
    steps = (B + 6 + 4) if cache == "token" else (S - 1) * B
    want = sum((P + (b + 1) * B if full[b] else 2 * B) + steps for b in range(n))
    assert g.stats.processed == want and g.stats.nfe == n * S


@pytest.mark.parametrize("canvas,cfg", [("fixed", 0.0), ("growing", 0.0), ("growing", 1.5)])
def test_token_cache_equals_dual_cache_at_two_steps_a_block(tiny, canvas, cfg):
    """At two steps a block the token cache's one step reruns the whole block (the positions the block
    start ran) against the same cache as the dual cache's step: the same tokens, padded rows and CFG too."""
    from illada_mlx.decode import decode, run

    model, _, _, mask = tiny
    rows = [prompts(1, n, 30 + n)[0].tolist() for n in (5, 9, 7)]
    out = {}
    for cache in ("dual", "token"):
        spec = _growing(mask, canvas=canvas, max_tokens=24, steps_per_block=2, cache=cache, cfg_scale=cfg)
        g = run(decode(model, rows, spec))
        out[cache] = g.tokens if canvas == "growing" else np.array(g.canvas).tolist()
    assert out["token"] == out["dual"]


def test_token_cache_needs_masked_logits(tiny):
    model, _, _, mask = tiny
    with pytest.raises(IlladaError, match="logits_at='masked'"):
        generate(
            model,
            mx.array(prompts(1, 5, 1)),
            steps=8,
            gen_length=8,
            block_length=8,
            mask_id=mask,
            cache="token",
            logits_at="block",
        )


def test_in_place_cache_matches_the_float64_cached_forward(ckpt_factory):
    # the cache's semantics re-derived in numpy (oracle.forward with a store): a full refresh, a step that
    # changed the block, the next block's window refresh (the finished block again, the new block), a dual
    # step that leaves the masked suffix as cached
    spec = ILLADA
    d, params = ckpt_factory(spec)
    model, _ = load(str(d))
    from illada_mlx.cache import BlockCache

    rng = np.random.default_rng(12)
    canvas = rng.integers(8, 250, (2, 30))
    cache, store = BlockCache(), {}
    plan = [(0, 14, 14), (6, 14, 14), (6, 22, 22), (14, 22, 30), (14, 30, 30)]  # (lo, hi, canvas length)
    for i, (lo, hi, L) in enumerate(plan):
        canvas[:, lo + i % 3] = rng.integers(8, 250, 2)  # the canvas changes between forwards
        cache.length = L
        got = np.array(model(mx.array(canvas[:, lo:hi]), cache=cache, offset=lo))
        ref = oracle.forward(
            params, canvas[:, lo:hi], spec.heads, spec.kv_heads, spec.theta, spec.eps, store=store, offset=lo, length=L
        )
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), (i, lo, hi)


@pytest.mark.parametrize("cfg", [0.0, 0.3])
def test_a_finished_row_leaves_the_others_cache_intact(tiny, cfg):
    # row 0 stops after block 0 (a stop string, say); row 1 goes on with its cache rows, so it decodes
    # exactly as it does alone
    from illada_mlx.decode import decode, run

    model, _, _, mask = tiny
    spec = _growing(
        mask, max_tokens=32, cache="prefix", rule="threshold", threshold=0.5, cfg_scale=cfg, logits_eos_inf=True
    )
    rows = prompts(2, 7, 13).tolist()
    both = run(decode(model, rows, spec, stop_fn=lambda r, toks: r == 0))
    alone = run(decode(model, rows[1:], spec))
    assert len(both.tokens[0]) == 8 and both.tokens[1] == alone.tokens[0]


def test_cache_buffers_are_allocated_once_per_call(tiny):
    from illada_mlx.cache import BlockCache
    from illada_mlx.decode import decode, run

    model, _, _, mask = tiny
    cache = BlockCache()
    run(
        decode(
            model,
            [prompts(1, 6, 14)[0].tolist()],
            _growing(mask, max_tokens=40, cache="prefix", logits_eos_inf=True),
            cache=cache,
        )
    )
    assert {k.shape[2] for k in cache.keys} == {6 + 40}  # sized to the canvas's budget at the start


def test_full_refresh_every_block_is_the_full_policy(tiny):
    from illada_mlx.decode import decode, run

    model, _, _, mask = tiny
    p = [prompts(1, 6, 15)[0].tolist()]
    full = run(decode(model, p, _growing(mask, max_tokens=32, cache="prefix", block_refresh="full")))
    every = run(decode(model, p, _growing(mask, max_tokens=32, cache="prefix", full_refresh_every=1)))
    assert full.tokens == every.tokens and full.stats.processed == every.stats.processed


@pytest.mark.parametrize("threshold,stable", [(0.4, 0.0), (0.5, 0.0), (0.9, 0.05)])
def test_token_cache_rows_decode_together_as_alone(tiny, threshold, stable):
    """Rows committing at different rates: each row's step reruns only what it had masked (a row with
    fewer repeats a position), so a batched row's logits at its masks are the ones it gets alone."""
    from illada_mlx.decode import decode

    model, _, _, mask = tiny
    rows = prompts(3, 7, 40).tolist()
    spec = _growing(
        mask,
        max_tokens=24,
        steps_per_block=8,
        rule="threshold",
        threshold=threshold,
        stable_threshold=stable,
        cache="token",
        logits_eos_inf=True,
    )

    def steps(ids):  # (block, step) -> (logits at the masks before the step, per row), tokens
        out, before, tokens = {}, None, None
        for ev in decode(model, ids, spec):
            if isinstance(ev, Step):
                lo = 7 + ev.block * 8
                m = (
                    (8 if ev.step == 0 else (before[:, lo : lo + 8] == mask).sum(axis=1)).tolist()
                    if ev.step
                    else [8] * len(ids)
                )
                lg = np.array(ev.logits)
                out[ev.block, ev.step] = [lg[r, : m[r]] for r in range(len(ids))]
                before = np.array(ev.canvas)
            elif not isinstance(ev, BlockDone):
                tokens = ev.tokens
        return out, tokens

    def steps_of(sp):
        return [ev for ev in decode(model, rows, sp) if isinstance(ev, Step)]

    together, toks = steps(rows)
    assert any(len({a.shape[0] for a in v}) > 1 for v in together.values())  # different rates
    for r, row in enumerate(rows):
        alone, toks_r = steps([row])
        assert toks_r[0] == toks[r]
        for at, lg in alone.items():
            np.testing.assert_allclose(together[at][r], lg[0], rtol=1e-4, atol=1e-5)
    if stable:  # the stable commits took part: fewer steps than the plain rule's
        assert len(together) < len(steps_of(replace(spec, stable_threshold=0.0)))


# ------------------------------------------------------------------------------- the fast path's mechanisms
def test_drift_is_the_cosine_distance_of_the_probes_keys(tiny):
    # BlockCache.drift re-derived in numpy: per probe, 1 − cos(cached key, fresh key) averaged over layers
    # and heads, the largest probe per row
    from illada_mlx.cache import BlockCache

    rng = np.random.default_rng(3)
    B, H, D, L, layers = 2, 3, 8, 10, 2
    cache = BlockCache()
    cache.reserve(L)
    old = [rng.standard_normal((B, H, L, D)).astype(np.float32) for _ in range(layers)]
    for i in range(layers):
        cache.update(i, mx.array(old[i]), mx.array(old[i]), 0)
    at = np.array([[1, 4, 7], [0, 2, 9]])
    new = [rng.standard_normal((B, H, 3, D)).astype(np.float32) for _ in range(layers)]
    cache.probe(2)  # the first two positions of each row are the probes
    for i in range(layers):
        cache.update_at(i, mx.array(new[i]), mx.array(new[i]), mx.array(at))
    got = np.array(cache.drift())
    cos = np.zeros((B, 2))
    for i in range(layers):
        o = np.take_along_axis(old[i], at[:, None, :2, None], axis=2)
        n = new[i][:, :, :2]
        cos += ((o * n).sum(-1) / np.linalg.norm(o, axis=-1) / np.linalg.norm(n, axis=-1)).sum(1)
    want = (1 - cos / (layers * H)).max(axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.array(cache.keys[0])[0, :, 4], new[0][0, :, 1])  # then written as usual


def test_probes_spread_over_each_rows_tokens():
    from illada_mlx.decode import probe_positions

    valid = mx.array([[1] * 20, [0] * 5 + [1] * 15])
    got = np.array(probe_positions(valid, 2, 20, 4)).tolist()
    assert got == [[4, 9, 14, 19], [8, 12, 16, 19]]  # start + ceil(i * span / n) - 1, the last at end - 1
    assert np.array(probe_positions(None, 1, 3, 5)).tolist() == [[0, 1, 1, 2, 2]]  # a short span repeats
    assert probe_positions(None, 1, 0, 4) is None


@pytest.mark.parametrize("cache", ["prefix", "token"])
def test_drift_refresh_at_threshold_zero_is_the_full_refresh(tiny, cache):
    # probes that moved at all recompute the canvas: over three blocks (starts 1 and 2, both allowed by the
    # doubling limit) every block start then is a full refresh, whose logits are the step's, so the tokens
    # are those of the full policy (the probe forward comes on top)
    from illada_mlx.decode import decode, run

    model, _, _, mask = tiny
    rows = prompts(2, 6, 21).tolist()
    kw = dict(max_tokens=24, cache=cache, rule="threshold", threshold=0.5, logits_eos_inf=True)
    full = run(decode(model, rows, _growing(mask, block_refresh="full", **kw)))
    drift = run(decode(model, rows, _growing(mask, block_refresh="drift", drift_threshold=0.0, **kw)))
    assert drift.tokens == full.tokens
    assert drift.stats.drift_refreshes == 2 * 2 and drift.stats.nfe == full.stats.nfe + 2  # rows x block starts
    never = run(decode(model, rows, _growing(mask, block_refresh="drift", drift_threshold=2.0, **kw)))
    assert never.stats.drift_refreshes == 0 and 0 < never.stats.max_drift < 1


def test_probes_run_only_where_a_refresh_may_follow(tiny):
    # nine blocks of 8: at drift threshold 0 the refreshes at blocks 1, 2, 4 and 8 are the only block
    # starts that probe (the doubling limit forbids the others); never refreshing, blocks 1 to 8 all may
    from illada_mlx.cache import BlockCache
    from illada_mlx.decode import decode, run

    class Counting(BlockCache):
        def probe(self, n):
            self.calls = getattr(self, "calls", 0) + 1
            super().probe(n)

    model, _, _, mask = tiny
    rows = [prompts(1, 6, 23)[0].tolist()]
    kw = dict(
        max_tokens=72, cache="prefix", rule="threshold", threshold=0.5, logits_eos_inf=True, block_refresh="drift"
    )
    for threshold, probed, refreshes in ((0.0, 4, 4), (2.0, 8, 0)):
        cache = Counting()
        g = run(decode(model, rows, _growing(mask, drift_threshold=threshold, **kw), cache=cache))
        assert (cache.calls, g.stats.drift_refreshes) == (probed, refreshes)


def test_drift_refresh_runs_at_most_once_each_time_the_reply_doubles(tiny):
    # nine blocks of 8 at threshold 0: the starts of blocks 1, 2, 4 and 8 (8, 16, 32 and 64 tokens written)
    from illada_mlx.decode import decode, run

    model, _, _, mask = tiny
    spec = _growing(
        mask,
        max_tokens=72,
        cache="prefix",
        rule="threshold",
        threshold=0.5,
        logits_eos_inf=True,
        block_refresh="drift",
        drift_threshold=0.0,
    )
    g = run(decode(model, [prompts(1, 6, 23)[0].tolist()], spec))
    assert g.stats.drift_refreshes == 4


def test_drift_refresh_every_step_is_identical_to_no_cache(tiny):
    model, _, _, mask = tiny
    p = mx.array(prompts(2, 6, 6))
    ref = generate(model, p, steps=12, gen_length=24, block_length=8, mask_id=mask)
    out = generate(
        model,
        p,
        steps=12,
        gen_length=24,
        block_length=8,
        mask_id=mask,
        cache="token",
        block_refresh="drift",
        refresh_every=1,
    )
    np.testing.assert_array_equal(np.array(out), np.array(ref))


def test_eos_fill_commits_the_masks_after_the_first_eos():
    # re-derived by hand: row 0 commits EOS at canvas position 12 this step (13 and 15 masked after it
    # fill; 11, before it, stays); row 1 held an EOS at 9 from an earlier step: every mask after it fills
    from illada_mlx.decode import fill_after_eos
    from illada_mlx.spec import DecodeSpec

    spec = DecodeSpec(mask_id=0, eos_id=2, eot_id=3)
    pos = mx.array([[11, 12, 13, 15], [10, 11, 12, 14]])
    x0 = mx.array([[7, 2, 8, 9], [5, 6, 7, 8]])
    transfer = mx.array([[False, True, False, False], [True, False, False, False]])
    is_mask = mx.array([[True, True, True, True], [True, True, True, False]])
    block = mx.array([[5, 0, 0, 0, 0, 0, 0, 0], [6, 3, 0, 0, 0, 0, 0, 0]])  # canvas 8..15 before the step
    x1, t1 = fill_after_eos(x0, transfer, is_mask, pos, block, 8, spec)
    assert np.array(t1).tolist() == [[False, True, True, True], [True, True, True, False]]
    assert np.array(mx.where(t1, x1, -1)).tolist() == [[-1, 2, 2, 2], [5, 2, 2, -1]]  # the rule's own commit stays


def test_eos_fill_ends_a_reply_in_fewer_forwards_with_the_same_text(tiny):
    # a model whose EOS gets a large logit bias near the end of the block: with the fill the padding after
    # the first EOS is one commit; the reply (cut at the EOS) is the one the plain rule decodes here
    from illada_mlx.decode import decode, run

    model, _, _, mask = tiny
    eos = model.args.eos_token_id
    rows = prompts(1, 6, 22).tolist()
    kw = dict(max_tokens=16, rule="threshold", threshold=0.6, cache="none", eos_id=eos)
    plain = run(decode(model, rows, _growing(mask, **kw)))
    filled = run(decode(model, rows, _growing(mask, eos_fill=True, **kw)))
    assert filled.stats.nfe <= plain.stats.nfe
    if eos in plain.tokens[0] + filled.tokens[0] or plain.finish_reasons == ["stop"]:
        assert filled.tokens == plain.tokens


def test_drift_refresh_rows_decode_together_as_alone(tiny):
    # a threshold between the rows' drifts: one row recomputes its canvas, the other does not, and each
    # decodes what it decodes alone (the refresh is per row, on that row's cache rows)
    from illada_mlx.decode import decode, run

    model, _, _, mask = tiny
    rows = [prompts(1, n, 50 + n)[0].tolist() for n in (6, 9)]
    # five blocks: the doubling limit counts per row (the row that refreshed at blocks 1 and 2 waits for
    # block 4, the other may refresh at block 3)
    base = dict(
        max_tokens=40,
        cache="token",
        rule="threshold",
        threshold=0.5,
        logits_eos_inf=True,
        block_refresh="drift",
        drift_probes=4,
    )
    alone = [run(decode(model, [r], _growing(mask, **base))) for r in rows]
    drifts = sorted(a.stats.max_drift for a in alone)
    assert drifts[0] < drifts[1]
    spec = _growing(mask, **{**base, "drift_threshold": (drifts[0] + drifts[1]) / 2})
    both = run(decode(model, rows, spec))
    for j, r in enumerate(rows):
        assert both.tokens[j] == run(decode(model, [r], spec)).tokens[0]
    assert 0 < both.stats.drift_refreshes


def _error_rule_np(conf, eps):
    """The error rule restated: by decreasing confidence while Σ (1 − c) ≤ ε, at least the best one."""
    out = np.zeros(conf.shape, bool)
    for b, row in enumerate(conf):
        order = [i for i in np.argsort(-row, kind="stable") if np.isfinite(row[i])]
        err, n = 0.0, 0
        for i in order:
            err += 1 - row[i]
            if err > eps:
                break
            n += 1
        out[b, order[: max(n, 1)]] = True
    return out


@pytest.mark.parametrize("cache", ["none", "token"])
def test_stable_commits_follow_their_definition(tiny, cache):
    # every step's commits re-derived from its logits: the error rule's, and each masked candidate with
    # confidence ≥ τ that the block's previous step predicted the same
    from illada_mlx.decode import decode

    model, _, _, mask = tiny
    rows = prompts(2, 6, 61).tolist()
    tau, eps = 0.05, 0.02
    spec = _growing(mask, max_tokens=24, rule="error", error_bound=eps, stable_threshold=tau, cache=cache)
    before, seen, extra = None, {}, 0
    for ev in decode(model, rows, spec):
        if not isinstance(ev, Step):
            continue
        canvas = np.array(ev.canvas)
        if ev.step == 0:  # a new block: its positions start as masks
            before, seen = canvas.copy(), {}
            before[:, 6 + 8 * ev.block :] = mask
        pos, lg = np.array(ev.positions), np.array(ev.logits, dtype=np.float64)
        p = np.exp(lg - lg.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x0, masked = p.argmax(-1), np.take_along_axis(before, pos, 1) == mask
        conf = np.where(masked, p.max(-1), -np.inf)
        prev = np.array([[seen.get((b, int(i)), -1) for i in row] for b, row in enumerate(pos)])
        stable = masked & (conf >= tau) & (prev == x0)
        rule = _error_rule_np(conf, eps)
        want = rule | stable
        np.testing.assert_array_equal(np.array(ev.committed), want)
        extra += int((stable & ~rule).sum())
        seen = {(b, int(i)): int(x0[b, k]) for b, row in enumerate(pos) for k, i in enumerate(row) if masked[b, k]}
        before = canvas
    assert extra > 0  # the stable commits added some


def test_stable_commits_off_is_the_plain_rule(tiny):
    from illada_mlx.decode import decode, run

    model, _, _, mask = tiny
    rows = prompts(2, 6, 62).tolist()
    kw = dict(max_tokens=24, rule="error", error_bound=0.02, cache="prefix")
    plain = run(decode(model, rows, _growing(mask, **kw)))
    off = run(decode(model, rows, _growing(mask, stable_threshold=0.0, **kw)))
    on = run(decode(model, rows, _growing(mask, stable_threshold=0.05, **kw)))
    assert off.tokens == plain.tokens and off.stats.nfe == plain.stats.nfe
    assert on.stats.nfe < plain.stats.nfe
