"""Quality yardstick: exact match of the decoded answer on the held-out task mix, per sampler / model.

    python bench/quality.py [--model DIR] [--n 50] [--samplers ...] [--json bench/results/quality.json]

Rows: exact mode (1 token per step: low-confidence remasking, random remasking, and strictly left to right
through 1-token blocks), variable length, fast mode
(τ = 0.9 + prefix cache), and the 8-bit / 4-bit conversions of the same checkpoint in exact mode (long
answers: in variable mode) or, with --q-sampler, another row's mode (the conversions run when the float
rows include it).
Rows of their own (--samplers NAME,...): exact_canvas128 (the official defaults' 128-token canvas),
fast_t0.9_nocache (fast mode's commits without its cache) and exact_random_remask_seed1/2 (other draws
of the random order). --recipe NAME adds an exact-mode row for a mixed-precision conversion, --q-mode
MODE one for a 4-bit float format (nvfp4, mxfp4) and one per recipe with that format as its body.
Multi-turn and long-answer rows (--tasks all: the five tasks, turn2,turn3,turn4 and the four counts,
count,countround,countby,countbyround):
"turn<k>" scores the answer to the k-th user turn of a conversation whose earlier k-1 exchanges are correct
(the held-out split is the last turn's, demo_tasks); the long tasks (67-255 token answers, 3-8 blocks) are
scored with a 256-token canvas or budget (`score_long`): whole-answer exact match, the position of the
first wrong token, and whether the answer ended (EOS) in its own block rather than at the budget.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from training.demo_tasks import EXTRA, LONG, TASKS, YARDSTICK_LONG, held_out_conversations, held_out_set
from training.yardstick import DEFAULT_ROWS, SAMPLERS, TURNS, evaluate, evaluate_chat, sampler_spec, score_long


def main():
    from illada_mlx.demo import BUNDLED
    from illada_mlx.load import load
    from illada_mlx.quant import QUANT_MODES, RECIPES
    from illada_mlx_convert import convert

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="HF checkpoint dir (default: the bundled demo model)")
    ap.add_argument("--n", type=int, default=50, help="held-out prompts per task")
    ap.add_argument(
        "--tasks",
        default=",".join(TASKS),
        help=f"held-out tasks (extra: {','.join(EXTRA)}; multi-turn: {','.join(TURNS)}; all: the "
        f"five, {','.join(TURNS)} and {','.join(YARDSTICK_LONG)})",
    )
    ap.add_argument(
        "--samplers",
        default=",".join(DEFAULT_ROWS),
        help=f"float32 rows, from {','.join(SAMPLERS)} (the 8/4-bit rows run when --q-sampler is one)",
    )
    ap.add_argument("--float-only", action="store_true", help="skip the 8/4-bit rows")
    ap.add_argument(
        "--recipe",
        action="append",
        default=[],
        metavar="NAME",
        help="also score a mixed-precision conversion (illada_mlx.quant.RECIPES; body 4-bit g32) in "
        "exact mode; repeatable",
    )
    ap.add_argument(
        "--q-mode",
        action="append",
        default=[],
        metavar="MODE",
        help="also score a 4-bit conversion in this mode (mxfp4, nvfp4; at the mode's group size) in "
        "exact mode, and each --recipe with this mode's body; repeatable",
    )
    ap.add_argument(
        "--q-sampler",
        default="exact",
        help="the sampler of the conversions' rows (exact: long answers in variable mode)",
    )
    ap.add_argument(
        "--chat",
        action="store_true",
        help="also score the multi-turn items as a chat session per conversation, the cross-turn cache "
        "carried from turn to turn (rows <sampler>_chat and, reusing the previous turn too, "
        "<sampler>_chat_delay0; float32, samplers with a cache)",
    )
    ap.add_argument("--json", default="bench/results/quality.json")
    a = ap.parse_args()
    src = a.model or str(BUNDLED)
    tasks = a.tasks.split(",")
    if "all" in tasks:
        every = (*TASKS, *TURNS, *YARDSTICK_LONG)
        tasks = list(dict.fromkeys(t for x in tasks for t in (every if x == "all" else (x,))))
    if set(tasks) - set(TASKS + EXTRA + TURNS):
        ap.error(
            f"unknown task(s) {sorted(set(tasks) - set(TASKS + EXTRA + TURNS))}: use {','.join(TASKS + EXTRA + TURNS)}"
        )
    samplers = a.samplers.split(",")
    if a.q_sampler not in SAMPLERS:
        ap.error(f"unknown --q-sampler {a.q_sampler!r}: use one of {','.join(SAMPLERS)}")
    if set(samplers) - set(SAMPLERS):
        ap.error(f"unknown sampler(s) {sorted(set(samplers) - set(SAMPLERS))}: use {','.join(SAMPLERS)}")
    if set(a.recipe) - set(RECIPES):
        ap.error(f"unknown recipe(s) {sorted(set(a.recipe) - set(RECIPES))}: use {','.join(RECIPES)}")
    fp4 = [m for m in QUANT_MODES if m != "affine" and 4 in QUANT_MODES[m][0]]
    if set(a.q_mode) - set(fp4):
        ap.error(f"unknown 4-bit mode(s) {sorted(set(a.q_mode) - set(fp4))}: use {','.join(fp4)}")
    items = held_out_set(a.n, tasks=[t for t in tasks if t not in LONG + TURNS])
    turns = [int(t[4:]) for t in tasks if t in TURNS]
    items += held_out_conversations(a.n, turns=turns) if turns else []
    long_items = held_out_set(a.n, tasks=[t for t in tasks if t in LONG])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        quantized = a.q_sampler in samplers and not a.float_only
        # name: the conversion's options; affine 4-bit at group 32 as the yardstick has always used, the float
        # formats at their own group size
        q4 = dict(quantize=True, q_bits=4, q_group_size=32)
        variants = {
            "float32": {},
            **({"8bit": {**q4, "q_bits": 8}, "4bit": q4} if quantized else {}),
            **{r: {**q4, "q_recipe": r} for r in a.recipe},
            **{f"4bit_{m}": dict(quantize=True, q_mode=m) for m in a.q_mode},
            **{f"{r}_{m}": dict(quantize=True, q_mode=m, q_recipe=r) for r in a.recipe for m in a.q_mode},
        }
        for name, options in variants.items():
            dst = Path(tmp) / name
            convert(src, str(dst), progress=False, **options)
            model, tok = load(str(dst))
            # a conversion's rows: --q-sampler (exact mode; long answers then in variable mode, where their
            # target is set)
            for sampler in samplers if name == "float32" else [a.q_sampler]:
                long_sampler = "variable" if name != "float32" and sampler == "exact" else sampler
                chat = [it for it in items if it[0] in TURNS] if a.chat and name == "float32" else []
                if chat and sampler_spec(model, tok, sampler).cache == "none":
                    chat = []  # no cache to carry across turns: the plain row says it all
                for r in (
                    ([evaluate(model, tok, items, sampler)] if items else [])
                    + ([evaluate_chat(model, tok, chat, sampler, d) for d in (1, 0)] if chat else [])
                    + ([score_long(model, tok, long_items, long_sampler)] if long_items else [])
                ):
                    r["weights"] = name
                    rows.append(r)
                    print(
                        f"{name:8s} {r['sampler']:22s} acc {r['accuracy']:.3f} {r['per_task']} forwards "
                        f"{r['forwards']}"
                        + (
                            f" eos in its block {r['eos_in_its_block']} tokens/row forward "
                            f"{r['tokens_per_row_forward']:.2f}"
                            if "gen" in r
                            else ""
                        ),
                        flush=True,
                    )
    out = {
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
        "model": src,
        "items": len(items) + len(long_items),
        "rows": rows,
    }
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
