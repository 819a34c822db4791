"""The demo model really decodes: a fast subset of the held-out quality suite (the full table is
bench/quality.py; its figures are in bench/README.md)."""

from pathlib import Path

import pytest

from illada_mlx.engine import build_prompt
from training.demo_tasks import held_out_set
from training.yardstick import evaluate

ITEMS = held_out_set(6, seed=777)  # 30 held-out prompts, 6 per task, never drawn in training


@pytest.fixture(scope="module")
def exact(demo):
    return evaluate(*demo, ITEMS, "exact", batch=30)


@pytest.mark.slow  # the exact-mode suite: 30 prompts
def test_suite_scores_every_task(exact):
    assert exact["n"] == 30 and set(exact["per_task"]) == {"add", "sort", "reverse", "recall", "parity"}
    assert exact["forwards"] == 32  # exact mode: one token per step over a 32-token canvas
    assert 0.0 <= exact["accuracy"] <= 1.0


@pytest.mark.slow  # the exact-mode suite
@pytest.mark.parametrize("task", ["add", "sort", "reverse"])
def test_exact_mode_solves_held_out_prompts(exact, task):
    # addition with carries, sorting, reversal: learned (bench: 96-100% on 50 held-out prompts each)
    assert exact["per_task"][task] >= 5 / 6, exact


@pytest.mark.slow  # the exact-mode suite
def test_exact_mode_recalls_values(exact):
    # key -> value recall, an induction-style lookup (find the key asked for, read the value two tokens
    # later): bench/quality.py measures 80% on 25 prompts, where answering a random value of the prompt
    # scores 38.5%
    assert exact["per_task"]["recall"] >= 0.6, exact


@pytest.mark.slow  # one forward per token
def test_left_to_right_row_decodes_one_token_block_at_a_time(demo):
    # the yardstick's AR-order row: 32 one-token blocks of one step each. On the tasks the model answers
    # from the prompt in one forward it scores like low-confidence remasking (bench: 94-100% on both)
    l2r = evaluate(*demo, [it for it in ITEMS if it[0] in ("add", "sort", "reverse")], "exact_left_to_right", batch=24)
    assert l2r["forwards"] == 32 and l2r["output_tokens"] > 0
    assert all(v >= 5 / 6 for v in l2r["per_task"].values()), l2r


@pytest.mark.slow  # teacher-forced probes over 30 prompts
def test_parity_leftmost_bit_needs_its_neighbours(demo):
    # why the commit order matters on parity: each answer bit is its right-hand neighbour XOR one list bit,
    # and the leftmost is the parity of all 12, which the model gets far more often once the other
    # answer bits are on the canvas than from the prompt alone. Low-confidence remasking therefore commits
    # it late; left to right commits it first (bench/quality.py's rows measure both)
    import mlx.core as mx

    model, tok = demo
    items = held_out_set(30, seed=31, tasks=("parity",))
    rows, mask_id = [], model.args.mask_token_id
    for _, prompt, answer in items:
        q = build_prompt(tok, [{"role": "user", "content": prompt}])
        a = tok.encode(answer, add_special_tokens=False)
        rows.append((q, a))
    n = len(rows[0][0])
    assert all(len(q) == n for q, _ in rows)  # 12 bits: every prompt is the same length
    full = mx.array([q + a + [model.args.eos_token_id] * 20 for q, a in rows])
    truth = full[:, n]
    hits = {}
    for case, span in (("all_masked", slice(n, n + 12)), ("neighbours_visible", slice(n, n + 1))):
        x = mx.array(full)
        x[:, span] = mask_id
        logits = model(x)[:, n]
        logits[:, mask_id] = -1e9
        hits[case] = mx.mean(mx.argmax(logits, -1) == truth).item()
    # random remasking, which may commit it early, is worse on parity (bench/README.md has the rows)
    assert hits["neighbours_visible"] >= hits["all_masked"] + 0.1, hits


@pytest.mark.slow  # against the exact-mode suite
def test_fast_mode_keeps_quality_with_half_the_forwards(demo, exact):
    fast = evaluate(*demo, ITEMS, "fast_t0.9_prefix", batch=30)
    assert fast["accuracy"] >= exact["accuracy"] - 1 / 30, (fast, exact)
    assert fast["forwards"] <= exact["forwards"] / 2, (fast, exact)


@pytest.mark.slow  # three long answers, one token per forward
def test_variable_mode_writes_a_long_answer_across_blocks_and_stops_in_its_block(demo):
    # count to a round hundred: 17-64 numbers, 67-255 tokens, 3-8 blocks of 32. The growing canvas adds a
    # block at a time, each continuing the ones before, and must stop (EOS) in the block where the answer
    # ends: not earlier, not at the budget. The oracle is the integers themselves
    from training.yardstick import score_long

    items = held_out_set(3, seed=777, tasks=("countround",))
    for _, prompt, answer in items:
        a, b = int(prompt.split()[1]), int(prompt.split()[3])
        assert answer == " ".join(map(str, range(a, b + 1))) and b % 100 == 0 and b - a >= 16
    r = score_long(*demo, items, "variable", batch=3)
    assert r["per_task"]["countround"] == 1 and r["eos_in_its_block"]["countround"] == 1, r
    assert r["forwards"] == 32 * max(-(-(n + 1) // 32) for n in r["answer_tokens"]["countround"])  # a block a step


@pytest.mark.slow  # a conversion and the exact-mode suite
def test_nvfp4_with_an_8bit_embedding_keeps_the_answers(exact, tmp_path):
    # a 4-bit float format with an 8-bit embedding (docs/convert.md: `-q --q-mode nvfp4 --q-recipe
    # mixed_4_8`, nvfp4 body, embedding and head affine 8-bit) still answers
    from illada_mlx.demo import BUNDLED
    from illada_mlx.load import load
    from illada_mlx_convert import convert

    convert(str(BUNDLED), str(tmp_path / "q"), quantize=True, q_mode="nvfp4", q_recipe="mixed_4_8", progress=False)
    q = evaluate(*load(str(tmp_path / "q")), ITEMS, "exact", batch=30)
    assert all(q["per_task"][t] >= 5 / 6 for t in ("add", "sort", "reverse")), q
    assert q["accuracy"] >= exact["accuracy"] - 2 / 30, (q, exact)


@pytest.mark.slow  # 64 and 128 forwards
@pytest.mark.parametrize("max_tokens", [64, 128])
def test_exact_mode_answers_on_a_longer_fixed_canvas(demo, max_tokens):
    # `generate --mode exact --max-tokens 128` (the official defaults' canvas: blocks of 32, one token per
    # step): the positions past the answer are filled with EOS, so the answer is the one a 32-token canvas
    # gives (the demo model is trained on answer areas of 16-256 positions)
    from fixtures import reply

    model, tok = demo
    items = [("add", "61+64=", "125"), ("sort", "sort 8 5 2 3", "2 3 5 8"), ("reverse", "reverse yxaw", "waxy")]
    if max_tokens == 128:
        items = items[1:2]  # 128 forwards over ~160 positions: one prompt keeps the suite quick
    for _, prompt, answer in items:  # held-out prompts (ITEMS)
        text, _, r = reply(model, tok, [{"role": "user", "content": prompt}], mode="exact", max_tokens=max_tokens)
        assert r.stats.nfe == max_tokens and text.strip() == answer, (prompt, text)


@pytest.mark.parametrize(
    "flag,value,said,listed",
    [
        ("--recipe", "mixed_9_9", "unknown recipe(s) ['mixed_9_9']", "mixed_4_8"),
        ("--q-mode", "affine", "unknown 4-bit mode(s) ['affine']", "mxfp4,nvfp4"),
    ],
)
def test_quality_script_refuses_an_unknown_recipe_or_mode(flag, value, said, listed):
    # --recipe NAME scores a mixed-precision conversion, --q-mode MODE a 4-bit float-format one (the affine
    # 4-bit row is always there); a name that is not one of them is refused before any work
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "bench" / "quality.py"
    r = subprocess.run(
        [sys.executable, str(script), flag, value, "--json", "/nonexistent/q.json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and said in r.stderr and listed in r.stderr
    assert "Traceback" not in r.stderr


def test_first_wrong_is_the_length_of_the_common_prefix():
    # oracle: os.path.commonprefix on the token lists; equal lists have no wrong token
    import os.path
    import random

    from training.yardstick import first_wrong

    rng = random.Random(0)
    for _ in range(500):
        want = [rng.randrange(3) for _ in range(rng.randrange(6))]
        got = [rng.randrange(3) for _ in range(rng.randrange(6))]
        for g in (got, want, want[:-1], want + [1]):
            assert first_wrong(g, want) == (None if g == want else len(os.path.commonprefix([g, want])))


def test_multi_turn_and_long_rows_score_their_items(demo):
    # the yardstick's issue-17 rows: a conversation item is decoded from its whole chat (the prompt is
    # longer than the last turn alone), and a long item on a 256-token budget reports where it goes wrong
    from training.demo_tasks import held_out_conversations
    from training.yardstick import score_long

    model, tok = demo
    conv = held_out_conversations(2, turns=(3,))
    r = evaluate(model, tok, conv, "fast_t0.9_prefix", batch=2)
    assert r["n"] == 2 and set(r["per_task"]) == {"turn3"}
    assert len(build_prompt(tok, conv[0][1])) > len(build_prompt(tok, conv[0][1][-1:])) + 10
    long = held_out_set(2, tasks=("count",))
    r = score_long(model, tok, long, "fast_t0.9_prefix", batch=2)
    assert r["n"] == 2 and r["gen"] == 256 and len(r["first_wrong"]["count"]) == 2
    assert r["answer_tokens"]["count"] == [len(a) for _, _, a in long]  # one token per digit and space
    assert all(w is None or 0 <= w <= n for w, n in zip(r["first_wrong"]["count"], r["answer_tokens"]["count"]))
    assert 0.0 <= r["blocks_right"]["count"] <= 1.0


def test_chat_rows_carry_the_cache_across_turns(demo):
    # a conversation scored as a chat session: the last turn reuses what earlier turns computed, so it runs
    # fewer tokens than the same conversation decoded from scratch
    from training.demo_tasks import held_out_conversations
    from training.yardstick import evaluate_chat

    model, tok = demo
    conv = held_out_conversations(2, turns=(3,))
    plain = evaluate(model, tok, conv, "fast_t0.9_token", batch=1)
    chat = evaluate_chat(model, tok, conv, "fast_t0.9_token")
    assert chat["sampler"] == "fast_t0.9_token_chat" and chat["n"] == 2 and set(chat["per_task"]) == {"turn3"}
    assert chat["turns_decoded"] == [3, 3]  # every user turn, the scored third one last
    assert chat["processed_tokens"] < plain["processed_tokens"] < chat["processed_tokens_all_turns"]
