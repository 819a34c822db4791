"""The synthetic instruction mix the demo model is trained on, and its held-out split.

The mix the yardstick scores (TASKS): two-digit addition (carries run right to left: a poor left-to-right
order), sorting digits (the answer depends on the whole list), reversing letters, key -> value recall,
and "parity", the order-sensitive one: suffix parities of 12 bits in list order ("parity 101100110100"
-> "011011101100", bit i the parity of list bits i..12). Each answer bit is its right-hand neighbour XOR
the list bit in its own place, while the leftmost is the parity of all 12 bits, which small transformers
find hard to compute in one pass: committing right to left is easy, left to right is not. Two-digit
addition turned out not to separate decoding orders: the demo model computes every digit of the sum from
the prompt in one forward (training/README.md). The list has a fixed length so that every bit a position
needs sits at a fixed distance from it; with 5-10 bits the CPU runs did not learn past the last two bits.

EXTRA tasks are drawn only when asked for (train_demo.py --tasks, quality.py --tasks) and are not on the
yardstick. "sums": running sums mod 10 listed last first ("sums 3 1 4 1 5" -> "4 9 8 4 3", the totals
3 4 8 9 14 mod 10 from the last back), an order-sensitive task the bundled model has not learned.
"recall_abcd" is recall with keys from a, b, c, d only: a training curriculum for recall's key match,
not a task of its own (training/README.md says what it does for the bundled model). "countend" is count with
2-8 numbers, one block: a curriculum for where a long count stops (the number just written against the
prompt's b), with every row's end in view; "countmid" the same with 9-16 numbers (two blocks), a step
between it and count's 3-8 blocks. Their prompts never equal a count prompt (b - a < 16). "countbyend" is
countby with 2-8 numbers: one block that starts from the prompt's a and step (b - a < 8 steps).

LONG tasks have answers of 67-255 tokens (the demo tokenizer makes every digit and space one token): they
fill 3-8 blocks of 32 (countbyround 3-7), so the EOS lands in a different block from row to row. Every
number is three digits wide, so an answer is 4 tokens a number and every block of 32 holds exactly 8 of
them. "count" counts from a to b ("count 137 to 202" -> "137 138 ... 202": each number is its left-hand
neighbour plus one, the end comes from the prompt). "countround" is count to a round hundred ("count 137
to 200"): its end is the first number ending in 00, a check on the number just written that needs no
comparison with the prompt's b (the tens of that comparison are what count has not learned,
training/README.md). "countby" counts in steps of 2-9 given by the prompt ("count 137 to 290 by 9" -> "137
146 ... 290"), so every number needs the prompt as well as its neighbour. "countbyround" is countby to a
round hundred in steps of 2-6 ("count 712 to 800 by 4" -> "712 716 ... 800", 17-50 numbers, all above the
hundred before): its step comes from the prompt and its end, as countround's, is the first number ending
in 00. "succ" (each digit of a 33-128 digit list from the prompt plus one mod 10, "succ 3 9 0" -> "4 0 1"
shown short) is kept for the record: in 30 CPU minutes the model did not learn it (training/README.md). They
are EXTRA tasks too.

Multi-turn conversations (`conversations`, `held_out_conversations`): 1-4 earlier user / assistant
exchanges from the five-task mix with correct answers, then the user turn to answer. A prompt belongs to
the held-out split iff a stable hash of it is 0 mod 10; training never draws such a prompt, in any turn.
A conversation's split is its last user turn's: the earlier turns always come from the training split,
so a held-out conversation is scored on a prompt training never saw and no held-out answer appears in
training as an earlier turn.
"""

from __future__ import annotations

import hashlib
import random

TASKS = ("add", "sort", "reverse", "recall", "parity")
YARDSTICK_LONG = ("count", "countround", "countby", "countbyround")  # the long tasks the yardstick scores
LONG = YARDSTICK_LONG + ("succ",)
CURRICULUM = ("countend", "countmid", "countbyend")  # shorter counts, for training only
EXTRA = ("sums", "recall_abcd") + LONG + CURRICULUM
TOOL_TASKS = ("tool_call", "tool_plain", "tool_result")  # tools offered (training/tool_tasks.py): messages
EVERY = TASKS + EXTRA + TOOL_TASKS
BLOCKWISE = LONG + CURRICULUM  # tasks whose rows are laid out block by block (training/train_rows.py)
COUNTS = YARDSTICK_LONG + CURRICULUM  # three-digit numbers a space apart
NUMBER_TOKENS = 4  # a count's number and the space or EOS after it, in demo-tokenizer tokens (one a character)
ORDERED = ("sums", "parity")  # answers whose digits each follow from the right-hand neighbour plus one list item
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _count(rng: random.Random, step: int, most: int = 64, least: int = 17, to_hundred: bool = False) -> tuple[str, str]:
    """Count from a to b in steps of `step`, `least`-`most` three-digit numbers (17-64: an answer of 67-255
    tokens); with `to_hundred`, b is a round hundred (200-900) and a lies n - 1 steps below it
    (countround, countbyround)."""
    n = rng.randint(least, most)
    if to_hundred:
        b = 100 * rng.randint(2, 9)
        a = b - step * (n - 1)
    else:
        a = rng.randint(100, 999 - step * (n - 1))
        b = a + step * (n - 1)
    answer = " ".join(str(x) for x in range(a, b + 1, step))
    return (f"count {a} to {b}" if step == 1 else f"count {a} to {b} by {step}"), answer


def _make(task: str, rng: random.Random) -> tuple[str, str]:
    if task == "add":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"{a}+{b}=", str(a + b)
    if task == "sort":
        xs = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
        return "sort " + " ".join(map(str, xs)), " ".join(map(str, sorted(xs)))
    if task == "reverse":
        s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
        return "reverse " + s, s[::-1]
    if task == "sums":
        xs = [rng.randint(0, 9) for _ in range(rng.randint(4, 7))]
        totals = [sum(xs[: i + 1]) % 10 for i in range(len(xs))]
        return "sums " + " ".join(map(str, xs)), " ".join(map(str, totals[::-1]))
    if task == "count":
        return _count(rng, 1)
    if task == "countround":
        return _count(rng, 1, to_hundred=True)
    if task == "countby":
        return _count(rng, rng.randint(2, 9))
    if task == "countbyround":
        k = rng.randint(2, 6)  # at most 99 // k + 1 numbers: all above the hundred before b
        return _count(rng, k, most=99 // k + 1, to_hundred=True)
    if task == "countend":
        return _count(rng, 1, most=8, least=2)
    if task == "countmid":
        return _count(rng, 1, most=16, least=9)
    if task == "countbyend":
        return _count(rng, rng.randint(2, 9), most=8, least=2)
    if task == "succ":
        xs = [rng.randint(0, 9) for _ in range(rng.randint(33, 128))]
        return "succ " + " ".join(map(str, xs)), " ".join(str((x + 1) % 10) for x in xs)
    if task == "parity":
        xs = [rng.randint(0, 1) for _ in range(12)]
        return "parity " + "".join(map(str, xs)), "".join(str(sum(xs[i:]) % 2) for i in range(len(xs)))
    keys = rng.sample(LETTERS[:4] if task == "recall_abcd" else LETTERS, rng.randint(2, 4))
    vals = [rng.randint(0, 9) for _ in keys]
    q = rng.randrange(len(keys))
    return " ".join(f"{k}={v}" for k, v in zip(keys, vals)) + f" ; {keys[q]}?", str(vals[q])


def held_out(prompt: str) -> bool:
    return int(hashlib.sha1(prompt.encode()).hexdigest(), 16) % 10 == 0


def examples(seed: int, split: str = "train", tasks=TASKS):
    """Endless (task, prompt, answer) from one split."""
    rng = random.Random(seed)
    while True:
        task = rng.choice(tasks)
        if task in TOOL_TASKS:  # messages, their base prompt from `split`
            from training.tool_tasks import make

            yield task, *make(task, rng, split)
            continue
        prompt, answer = _make(task, rng)
        if held_out(prompt) == (split == "test"):
            yield task, prompt, answer


def held_out_set(n_per_task: int = 50, seed: int = 12345, tasks=TASKS) -> list[tuple[str, str, str]]:
    """A fixed held-out set: n prompts per task, none of which training can draw."""
    out = []
    for task in tasks:
        seen, gen = set(), examples(seed + EVERY.index(task), "test", (task,))
        while len(seen) < n_per_task:
            t, p, a = next(gen)
            if str(p) not in seen:
                seen.add(str(p))
                out.append((t, p, a))
    return out


def draw(task: str, rng: random.Random, split: str) -> tuple[str, str]:
    """One (prompt, answer) of `task` from `split`."""
    while True:
        prompt, answer = _make(task, rng)
        if held_out(prompt) == (split == "test"):
            return prompt, answer


def conversation(rng: random.Random, task: str, earlier: int, split: str = "train"):
    """(messages, answer): `earlier` user / assistant exchanges drawn from the training split of TASKS
    (answers correct), then a user turn of `task` from `split`, the one `answer` answers."""
    messages = []
    for _ in range(earlier):
        p, a = draw(rng.choice(TASKS), rng, "train")
        messages += [{"role": "user", "content": p}, {"role": "assistant", "content": a}]
    p, a = draw(task, rng, split)
    return messages + [{"role": "user", "content": p}], a


def conversations(seed: int, split: str = "train", tasks=TASKS, earlier=(1, 2, 3, 4)):
    """Endless (task, messages, answer): the last turn's task from `tasks`, 1-4 earlier exchanges."""
    rng = random.Random(seed)
    while True:
        task = rng.choice(tasks)
        messages, answer = conversation(rng, task, rng.choice(earlier), split)
        yield task, messages, answer


def held_out_conversations(n_per_turn: int = 50, seed: int = 54321, turns=(2, 3, 4)):
    """The multi-turn yardstick: for each turn k in `turns`, n conversations whose k-th user turn (a
    held-out prompt from TASKS, the tasks in turn) is the one to answer; items ("turn<k>", messages, answer)."""
    out = []
    for k in turns:
        rng, seen = random.Random(seed + k), set()
        while len(seen) < n_per_turn:
            messages, answer = conversation(rng, TASKS[len(seen) % len(TASKS)], k - 1, "test")
            if messages[-1]["content"] not in seen:
                seen.add(messages[-1]["content"])
                out.append((f"turn{k}", messages, answer))
    return out
