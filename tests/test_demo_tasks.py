"""The demo model's synthetic tasks and its trainer: answers follow each task's rule (re-derived here from
the task's definition, not from the generator), the held-out split never leaks into training, and the
trainer writes a checkpoint the real converter takes."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from training.demo_tasks import (
    COUNTS,
    CURRICULUM,
    EXTRA,
    LONG,
    TASKS,
    conversations,
    examples,
    held_out,
    held_out_conversations,
    held_out_set,
)

ROOT = Path(__file__).resolve().parents[1]

DEMO = ROOT / "illada_mlx" / "demo_model"


def digits(s):
    return [int(c) for c in s.split()]


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_task_answers_by_its_rule(split):
    seen = set()
    for task, prompt, answer in itertools.islice(examples(3, split, TASKS + EXTRA), 3000):
        seen.add(task)
        if task == "add":
            a, b = prompt.rstrip("=").split("+")
            assert int(answer) == int(a) + int(b)
        elif task == "sort":
            assert digits(answer) == sorted(digits(prompt[len("sort ") :]))
        elif task == "reverse":
            assert answer == prompt[len("reverse ") :][::-1]
        elif task in ("recall", "recall_abcd"):
            pairs, key = prompt.rstrip("?").split(" ; ")
            table = dict(p.split("=") for p in pairs.split())
            assert table[key] == answer and 2 <= len(table) == len(pairs.split()) <= 4  # 2-4 distinct keys
            assert task == "recall" or set(table) <= set("abcd")  # the curriculum's small key alphabet
        elif task == "parity":  # suffix parities in list order
            xs, d = [int(c) for c in prompt[len("parity ") :]], [int(c) for c in answer]
            n = len(xs)
            assert len(d) == n and d[-1] == xs[-1] and d[0] == sum(xs) % 2
            # order-sensitive: each bit is its right-hand neighbour XOR the list bit in its own place
            assert all(d[j] == d[j + 1] ^ xs[j] for j in range(n - 1))
        elif task in COUNTS:
            # every k-th integer from a to b, in order, one space apart
            words = prompt.split(" ")
            a, b, k = int(words[1]), int(words[3]), int(words[5]) if len(words) == 6 else 1
            assert words[0] == "count" and words[2] == "to" and (k == 1) == ("countby" not in task)
            assert (task in CURRICULUM) == (b - a < 16 * k) and b > a and k <= 9
            assert (task in ("countround", "countbyround")) <= (b % 100 == 0 and b - a < 100)
            assert [int(n) for n in answer.split(" ")] == list(range(a, b + 1, k)) and (b - a) % k == 0
            assert all(len(n) == 3 for n in answer.split(" "))  # 3 digits each: 4 tokens a number
        elif task == "succ":  # each listed digit plus one, mod 10
            xs, d = digits(prompt[len("succ ") :]), digits(answer)
            assert d == [(x + 1) % 10 for x in xs] and answer == " ".join(map(str, d))
        else:  # sums: running totals mod 10, last first
            xs, d = digits(prompt[len("sums ") :]), digits(answer)
            n = len(xs)
            assert len(d) == n and d[-1] == xs[0] and d[0] == sum(xs) % 10
            # the order-sensitive property: each digit is its right-hand neighbour plus one list digit
            assert all(d[j] == (d[j + 1] + xs[n - 1 - j]) % 10 for j in range(n - 1))
    assert seen == set(TASKS + EXTRA)


def test_held_out_prompts_never_reach_training():
    train = {p for _, p, _ in itertools.islice(examples(0, "train", TASKS + EXTRA), 20000)}
    assert not any(held_out(p) for p in train)
    items = held_out_set(20, tasks=TASKS + EXTRA)
    assert all(held_out(p) for _, p, _ in items)
    assert [t for t, _, _ in items] == [t for t in TASKS + EXTRA for _ in range(20)]
    # asking for an extra task leaves the yardstick's own items as they were
    assert held_out_set(20) == items[: 20 * len(TASKS)]


def train_tiny(out, *args):
    """training/train_demo.py on a 1-layer, d-32 model with the bundled tokenizer."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "training.train_demo",
            "--out",
            str(out),
            "--d",
            "32",
            "--layers",
            "1",
            "--heads",
            "2",
            "--kv-heads",
            "1",
            "--ffn",
            "64",
            "--minutes",
            "0",
            "--workers",
            "0",
            "--tokenizer",
            str(ROOT / "illada_mlx" / "demo_model" / "tokenizer.json"),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow  # trains (a subprocess)
def test_trainer_writes_a_checkpoint_the_converter_takes(tmp_path):
    pytest.importorskip("torch")
    from illada_mlx.load import load
    from illada_mlx_convert import convert

    out = tmp_path / "ckpt"
    r = train_tiny(out, "--steps", "3", "--batch", "4", "--eval-every", "0", "--tasks", "reverse,sums")
    assert r.returncode == 0, r.stderr[-2000:]
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 3 and set(log["held_out_probe"]) == {"reverse", "sums"}
    assert set(log["order_probe"]) == {"neighbours_visible", "all_masked"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "illada" and cfg["num_key_value_heads"] == 1
    convert(str(out), str(tmp_path / "mlx"), progress=False)
    model, tok = load(str(tmp_path / "mlx"))
    assert model.args.mask_token_id == 5 and model.args.eos_token_id == 2


@pytest.mark.slow  # trains (a subprocess)
def test_trainer_with_no_steps_only_probes(tmp_path):
    # --steps 0: the probe of the starting weights, long tasks (variable mode) and conversations included
    pytest.importorskip("torch")
    out = tmp_path / "p"
    r = train_tiny(
        out, "--steps", "0", "--batch", "2", "--tasks", "reverse,count", "--multi-turn", "0.5", "--long-probe", "1"
    )
    assert r.returncode == 0, r.stderr[-2000:]
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 0 and log["final_loss_ema"] is None
    assert set(log["held_out_probe"]) == {"reverse", "count", "turn2", "turn3", "turn4"}
    assert set(log["end_probe"]) == {"count"} and set(log["end_probe"]["count"]) == {
        "end",
        "not_end",
        "same_last_digit",
        "decided_right",
        "stops_at_last_digit",
    }


@pytest.mark.slow  # trains (a subprocess)
def test_trainer_refuses_an_unknown_task(tmp_path):
    pytest.importorskip("torch")
    r = subprocess.run(
        [sys.executable, "-m", "training.train_demo", "--out", str(tmp_path / "x"), "--tasks", "add,divide"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "unknown task(s) ['divide']" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x").exists()


def test_batches_lay_out_answer_areas_of_drawn_lengths():
    # --max-area: each batch's answer area (answer, one EOS, EOS padding) has a length drawn from
    # [block / 2, max_area]; the prompt keeps its place and only the area is answer-maskable
    from tokenizers import Tokenizer

    from training.train_rows import EOS, batches

    tok = Tokenizer.from_file(str(ROOT / "illada_mlx" / "demo_model" / "tokenizer.json"))
    areas = set()
    for ids, answer, valid, maskable, _ in itertools.islice(batches(tok, 0, 4, 32, TASKS, max_area=256), 40):
        assert maskable.all()  # short rows may mask their prompt
        n = answer.sum(1)
        assert (n == n[0]).all() and 16 <= int(n[0]) <= 256
        areas.add(int(n[0]))
        for row, ans, ok in zip(ids.tolist(), answer.tolist(), valid.tolist()):
            start = ans.index(True)
            assert sum(ok) == start + int(n[0]) and all(ok[: start + int(n[0])])  # right padding is not valid
            area = row[start : start + int(n[0])]
            assert EOS in area and set(area[area.index(EOS) :]) == {EOS}
            assert row[0] == tok.token_to_id("<|im_start|>") and tok.decode(row[:start]).endswith("assistant\n")
    assert len(areas) > 10 and min(areas) < 32 < max(areas)
    # without --max-area every area is the block
    ids, answer, _, _, _ = next(batches(tok, 0, 4, 32, TASKS))
    assert (answer.sum(1) == 32).all()


@pytest.mark.parametrize("pad_weight, eos_weight", [(1.0, 1.0), (0.0, 1.0), (0.25, 1.0), (1.0, 5.0), (0.0, 3.0)])
def test_loss_with_every_answer_token_masked_weighs_padding_as_asked(pad_weight, eos_weight):
    # t_min = 1 masks the whole answer area (answer rows only); the loss is the mean cross-entropy over
    # it with the EOS padding after the answer's own EOS weighted by pad_weight and that EOS by eos_weight;
    # oracle: numpy float64
    torch = pytest.importorskip("torch")
    import numpy as np
    import oracle

    from training.train_demo import EOS, MASK, loss_fn

    V = 24
    x = torch.tensor([[10, 11, 12, 20, 21, EOS, EOS, EOS], [13, 14, 22, EOS, EOS, EOS, EOS, EOS]])
    answer = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    valid = torch.tensor([[1] * 8, [1] * 7 + [0]], dtype=torch.bool)
    logits = torch.randn(2, 8, V, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seen = []

    def model(ids, attention_mask):
        seen.append(ids.clone())
        return logits

    loss = loss_fn(model, x, answer, valid, answer_only=1.0, t_min=1.0, pad_weight=pad_weight, eos_weight=eos_weight)
    assert torch.equal(seen[0], torch.where(answer, MASK, x))  # the area masked, the prompt as it was
    logp = np.log(oracle.softmax(logits.numpy()))
    ce, w = [], []
    for b, (start, own_eos, end) in enumerate([(3, 5, 8), (2, 3, 7)]):  # answer area, its own EOS, area end
        for j in range(start, end):
            ce.append(-logp[b, j, int(x[b, j])])
            w.append(pad_weight if j > own_eos else eos_weight if j == own_eos else 1.0)
    want = np.dot(ce, w) / np.sum(w)
    assert abs(float(loss) - want) < 1e-9


def rule_answer(prompt):
    """The answer to one of the five tasks' prompts, recomputed from the prompt's text."""
    if prompt.endswith("="):
        a, b = prompt.rstrip("=").split("+")
        return str(int(a) + int(b))
    if prompt.startswith("sort "):
        return " ".join(sorted(prompt[5:].split()))
    if prompt.startswith("reverse "):
        return prompt[8:][::-1]
    if prompt.startswith("parity "):
        xs = prompt[7:]
        return "".join(str(xs[i:].count("1") % 2) for i in range(len(xs)))
    pairs, key = prompt.rstrip("?").split(" ; ")
    return dict(p.split("=") for p in pairs.split())[key]


def test_long_answers_span_two_to_eight_blocks_and_vary():
    # 64-255 tokens with the demo tokenizer: 2-8 blocks of 32, so the EOS lands in a different block from row to row
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    for task in LONG:
        lengths = [len(tok.encode(a).ids) for _, _, a in itertools.islice(examples(1, "train", (task,)), 400)]
        assert 64 <= min(lengths) and max(lengths) <= 255
        # blocks the answer fills (its EOS in the next block when it fills its last one)
        blocks = {(n + 31) // 32 for n in lengths}
        assert set(range(3, 8)) <= blocks <= set(range(2, 9)), task


def test_conversations_carry_correct_earlier_exchanges_and_keep_the_split():
    for split in ("train", "test"):
        turns = set()
        for task, messages, answer in itertools.islice(conversations(5, split, TASKS + LONG), 400):
            roles = [m["role"] for m in messages]
            k = len(messages) // 2  # earlier exchanges
            assert roles == ["user", "assistant"] * k + ["user"] and 1 <= k <= 4
            turns.add(k)
            for q, a in zip(messages[:-1:2], messages[1::2]):
                assert a["content"] == rule_answer(q["content"]) and not held_out(q["content"])
            last = messages[-1]["content"]
            assert held_out(last) == (split == "test")
            if task in TASKS:
                assert answer == rule_answer(last)
        assert turns == {1, 2, 3, 4}
    items = held_out_conversations(10)
    assert [t for t, _, _ in items] == [f"turn{k}" for k in (2, 3, 4) for _ in range(10)]
    for t, messages, answer in items:
        assert len(messages) == 2 * int(t[4:]) - 1 and held_out(messages[-1]["content"])
        assert answer == rule_answer(messages[-1]["content"])
    assert held_out_conversations(10) == items  # fixed


def test_training_rows_are_the_runtime_prompt_plus_the_answer():
    # one template: the trainer renders the chat_template of the bundled tokenizer_config.json; a row's
    # prompt must be exactly what engine.build_prompt gives the runtime's tokenizer for the same messages.
    # All conversations (multi_turn 1) or all single turns: one kind of row, so batches keep draw order.
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from illada_mlx.engine import build_prompt
    from training.train_rows import EOS, TEMPLATE, batches, draw_items

    assert TEMPLATE == json.loads((DEMO / "tokenizer_config.json").read_text())["chat_template"]
    runtime = PreTrainedTokenizerFast.from_pretrained(str(DEMO))
    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    for multi_turn in (1.0, 0.0):
        items = list(itertools.islice(draw_items(2, TASKS, multi_turn=multi_turn), 12))
        assert all((len(m) > 1) == bool(multi_turn) for _, m, _ in items)
        ids, answer, valid, _, _ = next(batches(tok, 2, 12, 32, TASKS, max_area=256, multi_turn=multi_turn))
        for (task, messages, a), row, ans in zip(items, ids.tolist(), answer.tolist()):
            start, area = ans.index(True), sum(ans)
            assert row[:start] == build_prompt(runtime, messages)
            want = runtime.encode(a, add_special_tokens=False) + [EOS]
            assert row[start : start + area] == (want + [EOS] * area)[:area]


def test_long_rows_are_laid_out_block_by_block_as_the_growing_canvas_decodes():
    # a long answer's row: the prompt, its first k blocks as written, then block k (answer tokens, EOS,
    # EOS padding to 32) as the only maskable area, nothing after it; k is one per batch, a shorter
    # answer taking its last block; the prompt and written blocks are never masked
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from illada_mlx.engine import build_prompt
    from training.train_rows import EOS, batches, draw_items

    runtime = PreTrainedTokenizerFast.from_pretrained(str(DEMO))
    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    items = draw_items(0, LONG)
    ks, last = set(), 0
    for ids, answer, valid, maskable, _ in itertools.islice(batches(tok, 0, 4, 32, LONG, max_area=256), 40):
        assert not maskable.any()
        row_ks = []
        for row, ans, ok in zip(ids.tolist(), answer.tolist(), valid.tolist()):
            _, messages, a = next(items)
            prompt = build_prompt(runtime, messages)
            want = runtime.encode(a, add_special_tokens=False) + [EOS]
            start, n, end = ans.index(True), sum(ans), sum(ok)
            assert n == 32 and end == start + 32 and all(ok[:end]) and all(ans[start:end])
            assert row[: len(prompt)] == prompt and (start - len(prompt)) % 32 == 0
            k = (start - len(prompt)) // 32
            assert k < -(-len(want) // 32)  # a block the answer (and its EOS) reaches
            assert row[len(prompt) : end] == (want + [EOS] * 32)[: 32 * (k + 1)]
            row_ks.append((k, -(-len(want) // 32) - 1))
        top = max(k for k, _ in row_ks)
        assert all(k == top or k == nb for k, nb in row_ks)  # one k a batch, or the row's last block
        ks.add(top)
        last += sum(k == nb for k, nb in row_ks)
    assert ks == set(range(8)) and last > 10


def test_trainer_variable_probe_decodes_like_the_samplers_variable_mode(demo):
    # the trainer's torch growing canvas (variable_generate) against the MLX decode loop's variable mode
    # (schedule rule, 32 steps per block) on the bundled weights: the same tokens up to the first EOS
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    from illada_mlx.decode import decode, run
    from illada_mlx.engine import build_prompt
    from illada_mlx.spec import make_spec
    from training.train_demo import EOS, TorchIllada, variable_generate

    model, tok = demo
    cfg = json.loads((DEMO / "config.json").read_text())
    tm = TorchIllada(cfg)
    tm.load_state_dict(load_file(str(DEMO / "model.safetensors")))
    tm.eval()
    spec = make_spec(model, tok, mode="variable", max_tokens=64, block_length=32, steps_per_block=32)
    for prompt in ("sort 9 3 7 1 4 2", "reverse qwerty", "count 37 to 102"):
        ids = build_prompt(tok, [{"role": "user", "content": prompt}])
        want = run(decode(model, [ids], spec)).tokens[0]
        x = variable_generate(tm, torch.tensor([ids]), 32, 2)[0, len(ids) :].tolist()
        assert (x[: x.index(EOS)] if EOS in x else x) == want, prompt


@pytest.mark.parametrize("first_block, last_block", [(1.0, 0.0), (0.0, 1.0)])
def test_long_rows_train_the_first_or_last_block_when_asked(first_block, last_block):
    # first_block 1: every row is the answer's first block after the bare prompt; last_block 1: every row is
    # the block holding the answer's own EOS (the written blocks before it in place)
    from tokenizers import Tokenizer

    from training.train_rows import EOS, batches, draw_items, render

    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    items = draw_items(1, LONG)
    for ids, answer, _, _, _ in itertools.islice(
        batches(tok, 1, 4, 32, LONG, first_block=first_block, last_block=last_block), 10
    ):
        for row, ans in zip(ids.tolist(), answer.tolist()):
            _, messages, a = next(items)
            want = tok.encode(render(messages) + a).ids[len(tok.encode(render(messages)).ids) :] + [EOS]
            k = (ans.index(True) - len(tok.encode(render(messages)).ids)) // 32
            assert k == (0 if first_block else (len(want) - 1) // 32)
            assert EOS in row[ans.index(True) :] or first_block


def test_end_rows_cut_after_a_number_half_at_the_end():
    # end_rows 1: every long row is cut right after one of its numbers, in the block holding the cut (the
    # blocks before it written), visible up to the cut and masked from there; the token at the cut is the
    # answer's EOS when that number is the prompt's b, else a space. Half are cut at the end; some of the
    # others after a number ending in b's last digit (a last-digit match alone would stop there)
    from tokenizers import Tokenizer

    from training.train_rows import EOS, batches, draw_items, render

    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    tasks = ("count", "countby", "countend")
    items = draw_items(4, tasks)
    ends, same_digit = [], 0
    for ids, answer, valid, _, masked_from in itertools.islice(batches(tok, 4, 8, 32, tasks, end_rows=1.0), 12):
        for row, ans, ok, cut in zip(ids.tolist(), answer.tolist(), valid.tolist(), masked_from.tolist()):
            _, messages, a = next(items)
            q = tok.encode(render(messages)).ids
            want = tok.encode(render(messages) + a).ids[len(q) :] + [EOS]
            start = ans.index(True)
            assert (start - len(q)) % 32 == 0 and 0 <= cut < 32 and start + 32 == len(ok) - ok[::-1].index(True)
            at = start + cut
            assert row[:at] == q + want[: at - len(q)]  # the prompt and the answer up to the cut, as written
            written = tok.decode(row[len(q) : at]).split(" ")
            b = messages[-1]["content"].split(" ")[3]
            assert len(written[-1]) == 3 and (row[at] == EOS) == (written[-1] == b)
            assert row[at] == EOS or tok.decode([row[at]]) == " "
            ends.append(row[at] == EOS)
            same_digit += row[at] != EOS and written[-1][-1] == b[-1]
    assert 0.35 < sum(ends) / len(ends) < 0.8 and same_digit >= 5


def test_loss_masks_an_end_rows_area_from_its_cut():
    # masked_from >= 0: the area is masked from that index on and visible before it, whatever t is drawn;
    # -1: random masking as before
    torch = pytest.importorskip("torch")
    from training.train_demo import MASK, loss_fn

    seen = {}

    def model(x, attention_mask=None):
        seen["x"] = x.clone()
        return torch.zeros(*x.shape, 300)

    x = torch.arange(10, 30).view(2, 10)
    answer = torch.zeros(2, 10, dtype=torch.bool)
    answer[:, 4:9] = True
    valid = torch.ones(2, 10, dtype=torch.bool)
    for _ in range(5):
        loss_fn(model, x, answer, valid, torch.tensor([False, False]), masked_from=torch.tensor([2, -1]))
        assert seen["x"][0].tolist() == x[0, :6].tolist() + [MASK] * 3 + [x[0, 9].item()]
        assert (seen["x"][1, :4] == x[1, :4]).all() and (seen["x"][1, 9] == x[1, 9])
