"""The synthetic instruction mix the demo model is trained on, and its held-out split.

Four tasks: two-digit addition (carries run right to left: a poor left-to-right order), sorting digits
(the answer depends on the whole list), reversing letters, and key -> value recall. A prompt belongs to
the held-out split iff a stable hash of it is 0 mod 10; training never draws such a prompt.
"""

from __future__ import annotations

import hashlib
import random

TASKS = ("add", "sort", "reverse", "recall")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


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
    keys = rng.sample(LETTERS, rng.randint(2, 4))
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
        prompt, answer = _make(task, rng)
        if held_out(prompt) == (split == "test"):
            yield task, prompt, answer


def held_out_set(n_per_task: int = 50, seed: int = 12345) -> list[tuple[str, str, str]]:
    """A fixed held-out set: n prompts per task, none of which training can draw."""
    out = []
    for task in TASKS:
        seen, gen = set(), examples(seed + TASKS.index(task), "test", (task,))
        while len(seen) < n_per_task:
            t, p, a = next(gen)
            if p not in seen:
                seen.add(p)
                out.append((t, p, a))
    return out
