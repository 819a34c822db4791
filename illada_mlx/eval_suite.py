"""`illada-mlx eval` as library calls: an `EvalConfig` in, the scores (the JSON the command writes) out.

Two kinds of run: lm-eval tasks on one model (`run_tasks`), or two conversions of one model scored on the
same items (`run_compare`). The caller loads checkpoints (`load(path, group) -> (model, tokenizer)`: the
command line converts the demo model on first use) and prints.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from . import evaluate as E
from .errors import IlladaError
from .files import check_output_file, check_writable


@dataclass
class EvalConfig:
    """`tasks` (a comma list of lm-eval tasks) on `model_path`, or `compare` (two model dirs) on `data` (JSONL
    of prompt/answer objects); the Monte-Carlo estimator's samples and rows per forward, CFG, the seed, the
    decoding mode of generation tasks; `parallel` under mlx.launch: "data" splits the requests, "tensor"
    the model."""

    model_path: Optional[str] = None
    tasks: Optional[str] = None
    include_path: Optional[str] = None
    limit: Optional[int] = None
    num_fewshot: Optional[int] = None
    apply_chat_template: bool = False
    compare: Optional[tuple[str, str]] = None
    data: Optional[str] = None
    raw: bool = False
    mc_num: int = 128
    batch_size: int = 32
    cfg_scale: float = 0.0
    seed: int = 0
    greedy_check: bool = True
    mode: Optional[str] = None
    parallel: str = "data"


def check(cfg: EvalConfig, json_out: Optional[str] = None) -> None:
    """What eval can refuse before it loads a model or scores anything."""
    if bool(cfg.tasks) == bool(cfg.compare):
        raise IlladaError("give either --tasks (lm-eval tasks) or --compare A B --data FILE")
    if cfg.compare and not cfg.data:
        raise IlladaError("--compare needs --data FILE.jsonl of prompt/answer objects")
    if cfg.mc_num % cfg.batch_size:
        raise IlladaError(
            f"--mc-num ({cfg.mc_num}) must be a multiple of batch_size (--batch-size {cfg.batch_size}), as "
            "in the official estimator"
        )
    if cfg.include_path is not None and not os.path.isdir(cfg.include_path):
        raise IlladaError(f"--include-path {cfg.include_path} is not a directory; name the folder of task YAMLs")
    if json_out is not None:
        check_writable(check_output_file(json_out, "--json"), "--json")


def groups(cfg: EvalConfig, group):
    """(the group a model is sharded over, the group the requests are split over): one of them, or neither."""
    tensor = cfg.parallel == "tensor" and group.size() > 1
    return (group if tensor else None), (group if group.size() > 1 and not tensor else None)


def run_compare(cfg: EvalConfig, load: Callable, group, progress: Optional[Callable] = None) -> dict:
    """Both models scored on cfg.data's items with the same masks (see evaluate.compare); `progress(n, total)`
    after every n of the total items scored."""
    shard, share = groups(cfg, group)
    parsed = E.parse_items(cfg.data)  # every line checked before a model loads
    (ma, ta), (mb, tb) = load(cfg.compare[0], shard), load(cfg.compare[1], shard)
    if ta.get_vocab() != tb.get_vocab():
        raise IlladaError("the two models have different tokenizers; compare conversions of one model")
    items = E.encode_items(parsed, ta, raw=cfg.raw)
    step = (lambda n: progress(n, len(items))) if progress else None
    est = E.Estimator(cfg.mc_num, cfg.batch_size, cfg.cfg_scale, cfg.seed)
    r = E.compare(ma, mb, items, est, progress=step, group=share)
    r.update(a=cfg.compare[0], b=cfg.compare[1], data=cfg.data)
    return r


def run_tasks(cfg: EvalConfig, load: Callable, group) -> dict:
    """lm-eval's results for cfg.tasks on cfg.model_path (see evaluate.run_tasks)."""
    shard, share = groups(cfg, group)
    model, tok = load(cfg.model_path, shard)
    return E.run_tasks(
        model,
        tok,
        [t for t in cfg.tasks.split(",") if t],
        cfg.include_path,
        cfg.limit,
        cfg.num_fewshot,
        cfg.apply_chat_template,
        mc_num=cfg.mc_num,
        batch_size=cfg.batch_size,
        cfg_scale=cfg.cfg_scale,
        seed=cfg.seed,
        greedy_check=cfg.greedy_check,
        mode=cfg.mode,
        group=share,
    )


def save(path: str, result: dict) -> None:
    """The scores as JSON (what lm-eval returns holds objects that JSON lacks: written as their text)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2, default=str))
