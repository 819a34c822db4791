"""The demo model's synthetic tasks and its trainer: answers follow each task's rule (re-derived here from
the task's definition, not from the generator), the held-out split never leaks into training, and the
trainer writes a checkpoint the real converter takes."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from demo_tasks import EXTRA, TASKS, examples, held_out, held_out_set  # noqa: E402


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
            assert digits(answer) == sorted(digits(prompt[len("sort "):]))
        elif task == "reverse":
            assert answer == prompt[len("reverse "):][::-1]
        elif task in ("recall", "recall_abcd"):
            pairs, key = prompt.rstrip("?").split(" ; ")
            table = dict(p.split("=") for p in pairs.split())
            assert table[key] == answer and 2 <= len(table) == len(pairs.split()) <= 4  # 2-4 distinct keys
            assert task == "recall" or set(table) <= set("abcd")  # the curriculum's small key alphabet
        elif task == "parity":  # suffix parities in list order
            xs, d = [int(c) for c in prompt[len("parity "):]], [int(c) for c in answer]
            n = len(xs)
            assert len(d) == n and d[-1] == xs[-1] and d[0] == sum(xs) % 2
            # order-sensitive: each bit is its right-hand neighbour XOR the list bit in its own place
            assert all(d[j] == d[j + 1] ^ xs[j] for j in range(n - 1))
        else:  # sums: running totals mod 10, last first
            xs, d = digits(prompt[len("sums "):]), digits(answer)
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
    assert held_out_set(20) == items[:20 * len(TASKS)]


def test_trainer_writes_a_checkpoint_the_converter_takes(tmp_path):
    pytest.importorskip("torch")
    from illada_mlx.load import load
    from illada_mlx_convert import convert

    out = tmp_path / "ckpt"
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_demo.py"), "--out", str(out), "--steps", "3", "--batch", "4",
         "--d", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--ffn", "64", "--minutes", "0",
         "--eval-every", "0", "--workers", "0", "--tasks", "reverse,sums",
         "--tokenizer", str(ROOT / "illada_mlx" / "demo_model" / "tokenizer.json")],
        capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps"] == 3 and set(log["held_out_probe"]) == {"reverse", "sums"}
    assert set(log["order_probe"]) == {"neighbours_visible", "all_masked"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "illada" and cfg["num_key_value_heads"] == 1
    convert(str(out), str(tmp_path / "mlx"), progress=False)
    model, tok = load(str(tmp_path / "mlx"))
    assert model.args.mask_token_id == 5 and model.args.eos_token_id == 2


def test_trainer_refuses_an_unknown_task(tmp_path):
    pytest.importorskip("torch")
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "train_demo.py"), "--out", str(tmp_path / "x"),
                        "--tasks", "add,divide"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown task(s) ['divide']" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x").exists()


def test_batches_lay_out_answer_areas_of_drawn_lengths():
    # --max-area: each batch's answer area (answer, one EOS, EOS padding) has a length drawn from
    # [block / 2, max_area]; the prompt keeps its place and only the area is answer-maskable
    pytest.importorskip("torch")
    from tokenizers import Tokenizer
    from train_demo import EOS, batches

    tok = Tokenizer.from_file(str(ROOT / "illada_mlx" / "demo_model" / "tokenizer.json"))
    areas = set()
    for ids, answer, valid in itertools.islice(batches(tok, 0, 4, 32, TASKS, max_area=256), 40):
        n = answer.sum(1)
        assert (n == n[0]).all() and 16 <= int(n[0]) <= 256
        areas.add(int(n[0]))
        for row, ans, ok in zip(ids.tolist(), answer.tolist(), valid.tolist()):
            start = ans.index(True)
            assert sum(ok) == start + int(n[0]) and all(ok[:start + int(n[0])])  # right padding is not valid
            area = row[start:start + int(n[0])]
            assert EOS in area and set(area[area.index(EOS):]) == {EOS}
            assert row[0] == tok.token_to_id("<|im_start|>") and tok.decode(row[:start]).endswith("assistant\n")
    assert len(areas) > 10 and min(areas) < 32 < max(areas)
    # without --max-area every area is the block
    ids, answer, _ = next(batches(tok, 0, 4, 32, TASKS))
    assert (answer.sum(1) == 32).all()


@pytest.mark.parametrize("pad_weight", [1.0, 0.0, 0.25])
def test_loss_with_every_answer_token_masked_weighs_padding_as_asked(pad_weight):
    # t_min = 1 masks the whole answer area (answer rows only); the loss is the mean cross-entropy over
    # it with the EOS padding after the answer's own EOS weighted by pad_weight; oracle: numpy float64
    torch = pytest.importorskip("torch")
    import numpy as np
    import oracle
    from train_demo import EOS, MASK, loss_fn

    V = 24
    x = torch.tensor([[10, 11, 12, 20, 21, EOS, EOS, EOS],
                      [13, 14, 22, EOS, EOS, EOS, EOS, EOS]])
    answer = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    valid = torch.tensor([[1] * 8, [1] * 7 + [0]], dtype=torch.bool)
    logits = torch.randn(2, 8, V, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    seen = []

    def model(ids, attention_mask):
        seen.append(ids.clone())
        return logits

    loss = loss_fn(model, x, answer, valid, answer_only=1.0, t_min=1.0, pad_weight=pad_weight)
    assert torch.equal(seen[0], torch.where(answer, MASK, x))  # the area masked, the prompt as it was
    logp = np.log(oracle.softmax(logits.numpy()))
    ce, w = [], []
    for b, (start, own_eos, end) in enumerate([(3, 5, 8), (2, 3, 7)]):  # answer area, its own EOS, area end
        for j in range(start, end):
            ce.append(-logp[b, j, int(x[b, j])])
            w.append(pad_weight if j > own_eos else 1.0)
    want = np.dot(ce, w) / np.sum(w)
    assert abs(float(loss) - want) < 1e-9
