"""`illada-mlx eval`: lm-eval tasks with our model, and the quick "what did converting cost" comparison.

compare: two conversions of one model score the same (prompt, answer) items with the same Monte-Carlo
masks; the per-token log-likelihood difference (A − B) is reported with a 95% confidence interval over
items, with how often their greedy answers (the official suffix greedy decoding) agree and how often each
reproduces the reference answer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .config import IlladaError
from .engine import build_prompt
from .files import read_user_file
from .likelihood import chunk_size, greedy_answers, log_likelihoods

MAX_DATA_BYTES = 64 << 20  # a --data file: far beyond any comparison's items, far below a memory problem


def read_items(path: str, tokenizer, raw: bool = False) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) from a JSONL file of {"prompt": text, "answer": text} (or "messages" for
    the prompt); a text prompt goes through the chat template as a user turn unless raw."""
    return encode_items(parse_items(path), tokenizer, raw)


def encode_items(parsed: list[tuple[str, list[dict]]], tokenizer, raw: bool = False) -> list[tuple[list, list]]:
    """(prompt ids, answer ids) of parse_items' (answer, messages)."""
    return [
        (build_prompt(tokenizer, msgs, raw=raw), tokenizer.encode(answer, add_special_tokens=False))
        for answer, msgs in parsed
    ]


def parse_items(path: str) -> list[tuple[str, list[dict]]]:
    """(answer, messages) per line of a JSONL file, every line checked (before any model is loaded). The
    file must be a regular file of at most MAX_DATA_BYTES of UTF-8."""
    data = read_user_file(path, "--data", MAX_DATA_BYTES)
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise IlladaError(f"--data {path}: not UTF-8 (byte {data[e.start]:#04x} at offset {e.start}); fix its encoding")
    items = [_item(line, f"{path}:{n}") for n, line in enumerate(lines, 1) if line.strip()]
    if not items:
        raise IlladaError(f"{path}: no items")
    return items


def _item(line: str, where: str) -> tuple[str, list[dict]]:
    """(answer, messages) of one JSONL line, every field checked."""
    shape = f'{where}: expected a JSON object with "prompt" (or "messages") and "answer" strings'
    try:
        obj = json.loads(line)
    except RecursionError:
        raise IlladaError(f"{where}: JSON nested too deeply to be an item; fix the line")
    except json.JSONDecodeError:
        raise IlladaError(shape)
    if not isinstance(obj, dict) or "answer" not in obj:
        raise IlladaError(shape)
    answer, msgs = obj["answer"], obj.get("messages")
    if not isinstance(answer, str) or not answer:
        raise IlladaError(f'{where}: "answer" must be a non-empty string')
    if msgs is None:
        if not isinstance(obj.get("prompt"), str):
            raise IlladaError(shape)
        msgs = [{"role": "user", "content": obj["prompt"]}]
    ok = (
        isinstance(msgs, list)
        and msgs
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
        )
    )
    if not ok:
        raise IlladaError(f'{where}: "messages" must be a non-empty list of {{role, content}} strings')
    return answer, msgs


@dataclass(frozen=True)
class Estimator:
    """The Monte-Carlo estimator's settings: mc_num samples in rows of batch_size per forward, the CFG scale
    and the seed of the masks."""

    mc_num: int = 32
    batch_size: int = 32
    cfg_scale: float = 0.0
    seed: int = 0


def _score_both(model_a, model_b, items, est: Estimator, progress=None, group=None) -> list[tuple]:
    """(log-likelihood on A, on B, greedy answer of A, of B) per item, with the same masks on both models;
    under a group each rank scores a share of the chunks and every rank gets every item's figures."""
    from .distributed import gather, split

    chunk = chunk_size(est.mc_num, est.batch_size)
    starts = list(range(0, len(items), chunk))
    mine = starts if group is None else split(starts, group.rank(), group.size())
    scored = []
    for s in mine:
        part = items[s : s + chunk]
        a = log_likelihoods(model_a, part, est.mc_num, est.batch_size, est.cfg_scale, est.seed)
        masks = [x.masks for x in a]
        b = log_likelihoods(model_b, part, est.mc_num, est.batch_size, est.cfg_scale, est.seed, masks=masks)
        lengths = [(p, len(q)) for p, q in part]
        scored += list(
            zip(
                [x.log_likelihood for x in a],
                [x.log_likelihood for x in b],
                greedy_answers(model_a, lengths, est.cfg_scale),
                greedy_answers(model_b, lengths, est.cfg_scale),
            )
        )
        if progress is not None:
            progress(len(part))
    return scored if group is None else gather(group, scored)


def compare(model_a, model_b, items, est: Optional[Estimator] = None, progress=None, group=None) -> dict:
    """Score items on both models with the same masks (est: the estimator's settings, default Estimator());
    the summary and the per-item figures. group (data parallel under mlx.launch): each rank scores a share
    of the chunks one process would score, and every rank gets every item's figures in order."""
    est = est if est is not None else Estimator()
    scored = _score_both(model_a, model_b, items, est, progress, group)
    ll_a, ll_b, g_a, g_b = ([x[i] for x in scored] for i in range(4))
    n_tok = np.array([len(q) for _, q in items], dtype=np.float64)
    d = (np.array(ll_a) - np.array(ll_b)) / n_tok
    mean = float(d.mean())
    half = 1.96 * float(d.std(ddof=1)) / math.sqrt(len(d)) if len(d) > 1 else float("inf")
    answers = [q for _, q in items]
    return {
        "items": len(items),
        "mc_num": est.mc_num,
        "seed": est.seed,
        "per_token_ll_diff": mean,
        "ci95": [mean - half, mean + half],
        "greedy_agreement": float(np.mean([x == y for x, y in zip(g_a, g_b)])),
        "greedy_exact_a": float(np.mean([x == q for x, q in zip(g_a, answers)])),
        "greedy_exact_b": float(np.mean([x == q for x, q in zip(g_b, answers)])),
        "per_item": [{"ll_a": x, "ll_b": y, "tokens": int(t)} for x, y, t in zip(ll_a, ll_b, n_tok)],
    }


def run_tasks(
    model,
    tokenizer,
    tasks: list[str],
    include_path: Optional[str] = None,
    limit: Optional[int] = None,
    num_fewshot: Optional[int] = None,
    chat_template: bool = False,
    group=None,
    **model_args,
) -> dict:
    """lm-eval's simple_evaluate on `tasks` with this model; a task that needs a download that cannot
    happen, or an unknown task, is refused in one line. group: data parallel (see IlladaLM)."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise IlladaError("--tasks needs lm-eval: pip install 'illada-mlx[eval]'")
    from .lm_eval_model import IlladaLM

    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise IlladaError(
            f"unknown task {unknown[0]!r}; lm-eval knows {len(manager.all_tasks)} tasks "
            "(`lm_eval ls tasks`), and --include-path adds a folder of task YAMLs"
        )
    lm = IlladaLM(model=model, tokenizer=tokenizer, group=group, **model_args)
    try:
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            apply_chat_template=chat_template,
            log_samples=False,
            verbosity="ERROR",
        )
    except IlladaError:
        raise
    except Exception as e:  # datasets / hub failures surface as many types
        text = f"{type(e).__name__}: {e}".splitlines()[0]
        if any(w in text.lower() for w in ("connect", "offline", "resolve", "internet", "network", "hub")):
            raise IlladaError(
                f"a task needs to download its data and cannot ({text[:160]}); run it once with "
                "network, or point a local task YAML at local data files with --include-path"
            )
        raise IlladaError(f"lm-eval failed: {text[:200]}")


def summary_line(r: dict) -> str:
    lo, hi = r["ci95"]
    return (
        f"{r['items']} items: per-token log-likelihood A − B = {r['per_token_ll_diff']:+.4f} "
        f"(95% CI {lo:+.4f} .. {hi:+.4f}); greedy answers agree on {100 * r['greedy_agreement']:.1f}%; "
        f"exact A {100 * r['greedy_exact_a']:.1f}%, B {100 * r['greedy_exact_b']:.1f}%"
    )
