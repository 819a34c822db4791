"""Structured output on the demo model's held-out tasks: right values inside JSON and in tool calls, beside
the same prompts answered free-form, in the same run.

    python bench/structured_tasks.py [--n 25] [--mode fast] [--json bench/results/structured_tasks.json]

Families (held-out prompts, training/demo_tasks.py; the schemas and tools are training/tool_tasks.py's):
- `json`: each of the five tasks answered as `{"answer": value}` (integer for add and recall, else a
  string): right when the value equals the task's answer; beside it the same prompts free-form.
- `call`: addition and reversing prompts with every tool offered (add, reverse, now), tool_choice "auto":
  right when the model calls the right tool with the right arguments.
- `no_call`: sort, recall and parity prompts with every tool offered, "auto": right when it answers
  without a call and the answer is right.
- `round_trip`: the call, then its result as a tool message: right when the answer is the result.
Each row: accuracy, forwards and processed tokens per answer (a JSON answer's include its template's
choice scoring; a call's its decision and name scoring).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from illada_mlx.engine import build_prompt
from illada_mlx.load import load
from illada_mlx.structured import generate_json
from illada_mlx.tools import generate_tool_call, parse_tools, plain_messages
from training.demo_tasks import held_out_set
from training.tool_tasks import CATALOG, TOOL_FOR, answer_schema, answer_value, arguments
from training.yardstick import evaluate

FREE_SAMPLER = {"fast": "default", "variable": "variable", "exact": "exact"}


def counted(name: str, results: list) -> dict:
    """A family's row from (right, forwards, processed) per answer."""
    n = len(results)
    return {
        "family": name,
        "n": n,
        "accuracy": sum(r for r, _, _ in results) / n,
        "forwards_per_answer": sum(f for _, f, _ in results) / n,
        "processed_per_answer": sum(p for _, _, p in results) / n,
    }


def json_family(model, tok, items, mode: str) -> dict:
    out = []
    for task, p, a in items:
        ids = build_prompt(tok, [{"role": "user", "content": p}])
        r = generate_json(model, tok, ids, answer_schema(task), mode=mode)
        out.append((r.value == answer_value(task, a), r.stats.nfe, r.stats.processed))
    return counted("json", out)


def tool_messages(p: str, tools) -> list[dict]:
    return plain_messages([{"role": "user", "content": p}], tools)


def call_family(model, tok, items, tools, mode: str, want_call: bool) -> dict:
    out = []
    for task, p, a in items:
        r = generate_tool_call(model, tok, build_prompt(tok, tool_messages(p, tools)), tools, "auto", mode=mode)
        if want_call:
            right = r.call is not None and (r.call.name, r.call.arguments) == (TOOL_FOR[task], arguments(task, p))
        else:
            right = r.call is None and r.text.strip() == a
        out.append((right, r.stats.nfe, r.stats.processed))
    return counted("call" if want_call else "no_call", out)


def round_trip_items(items, tools) -> list:
    """(task, messages, answer): the call and its result in the history, the answer to give."""
    out = []
    for task, p, a in items:
        call = {"id": "call_0", "type": "function", "function": {"name": TOOL_FOR[task]}}
        call["function"]["arguments"] = json.dumps(arguments(task, p))
        history = [
            {"role": "user", "content": p},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_0", "content": a},
        ]
        out.append((task, plain_messages(history, tools), a))
    return out


def free_row(model, tok, items, mode: str, name: str) -> dict:
    r = evaluate(model, tok, items, FREE_SAMPLER[mode], batch=1)
    return {
        "family": name,
        "n": r["n"],
        "accuracy": r["accuracy"],
        "per_task": r["per_task"],
        "forwards_per_answer": r["forwards"] / r["n"],
        "processed_per_answer": r["processed_tokens"] / r["n"],
    }


def rows(model, tok, n: int, mode: str) -> list[dict]:
    tools = parse_tools(CATALOG)
    tasks = held_out_set(n)
    callable_ = [it for it in tasks if it[0] in TOOL_FOR]
    other = [it for it in tasks if it[0] not in TOOL_FOR]
    out = [
        json_family(model, tok, tasks, mode),
        free_row(model, tok, tasks, mode, "json_free_form"),
        call_family(model, tok, callable_, tools, mode, True),
        free_row(model, tok, callable_, mode, "call_free_form"),
        call_family(model, tok, other, tools, mode, False),
        free_row(model, tok, round_trip_items(callable_, tools), mode, "round_trip"),
    ]
    for r in out:
        print(json.dumps(r), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=25, help="held-out prompts per task")
    ap.add_argument("--mode", default="fast", choices=sorted(FREE_SAMPLER))
    ap.add_argument("--model", default=None, help="a model directory (default: the bundled demo model)")
    ap.add_argument("--json", default="bench/results/structured_tasks.json")
    a = ap.parse_args()
    model, tok = load(a.model) if a.model else load()
    t0 = time.perf_counter()
    out = {
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
        "mode": a.mode,
        "rows": rows(model, tok, a.n, a.mode),
    }
    out["seconds"] = round(time.perf_counter() - t0, 1)
    Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
