"""Write the multiple-choice task the likelihood tests use: held-out prompts of the demo mix, each with its
correct answer and three wrong ones from the same task family (a changed sum, another order of the same
digits, another arrangement of the same letters, another value, flipped bits).

    python -m training.mc_task --n 5 --out tests/data/demo_mc.jsonl            # what tests/test_eval.py reads
    python -m training.mc_task --n 10 --out training/tasks/demo_mc50.jsonl     # the eval yardstick's task

Each line: {"task", "prompt" (the user's text), "choices", "gold" (index of the correct one)}.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from training.demo_tasks import TASKS, held_out_set


def distractors(task: str, prompt: str, answer: str, rng: random.Random, n: int = 3) -> list[str]:
    """n different wrong answers of the same family as `answer`."""
    out: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if task == "add":
            wrong = str(int(answer) + rng.choice([-11, -10, -2, -1, 1, 2, 9, 10, 11]))
        elif task in ("sort", "reverse"):
            parts = answer.split(" ") if task == "sort" else list(answer)
            rng.shuffle(parts)
            wrong = (" " if task == "sort" else "").join(parts)
            if tries > 20:  # too few orders of these items: change one item too
                new = rng.choice("xyz") if task == "reverse" else str(rng.randint(0, 9))
                wrong = wrong[:-1] + new
        elif task == "recall":
            wrong = str(rng.randint(0, 9))
        else:
            bits = list(answer)
            i = rng.randrange(len(bits))
            bits[i] = "1" if bits[i] == "0" else "0"
            wrong = "".join(bits)
        if wrong != answer:
            out.add(wrong)
    return sorted(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10, help="held-out prompts per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="the JSONL file to write")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    lines = []
    items = held_out_set(a.n, seed=777, tasks=TASKS)
    items = [items[t * a.n + i] for i in range(a.n) for t in range(len(TASKS))]  # round robin: --limit stays mixed
    for task, prompt, answer in items:
        choices = distractors(task, prompt, answer, rng) + [answer]
        rng.shuffle(choices)
        lines.append(json.dumps({"task": task, "prompt": prompt, "choices": choices, "gold": choices.index(answer)}))
    Path(a.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
