"""The demo model's training rows, laid out as the runtime decodes them (no PyTorch here, so the tests that
hold the rows to the runtime's prompts run wherever the runtime does; training/train_demo.py turns them into
tensors)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

from training.demo_tasks import BLOCKWISE, NUMBER_TOKENS, TASKS, TOOL_TASKS, conversations, examples

MASK, EOS = 5, 2
# the chat template has one source, the bundled tokenizer_config.json: training rows are rendered from it
# and every checkpoint train_demo.py writes carries it (engine.build_prompt renders the same string)
TEMPLATE = json.loads(
    (Path(__file__).resolve().parents[1] / "illada_mlx" / "demo_model" / "tokenizer_config.json").read_text()
)["chat_template"]


@functools.lru_cache(maxsize=4)
def _compiled(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)


def render(messages: list[dict], template: str = TEMPLATE) -> str:
    """The chat template rendered with a generation prompt, as transformers' apply_chat_template renders it
    (a sandboxed jinja2 environment with trim_blocks and lstrip_blocks; compiled once per template)."""
    return _compiled(template).render(messages=messages, add_generation_prompt=True)


def chat_prompt(question: str) -> str:
    """One user turn through the chat template."""
    return render([{"role": "user", "content": question}])


def draw_items(seed: int, tasks, multi_turn: float = 0.0):
    """Endless (task, messages, answer): single user turns from `tasks` and, a `multi_turn` share of them,
    conversations whose last user turn is from `tasks` (its short ones, when it has any) after 1-4 earlier
    exchanges (demo_tasks)."""
    last = tuple(t for t in tasks if t not in BLOCKWISE + TOOL_TASKS)  # a conversation's last turn: a short task
    single, multi = examples(seed, tasks=tasks), conversations(seed + 7, tasks=last or tasks)
    coin = np.random.default_rng(seed + 11)
    while True:
        if multi_turn and coin.random() < multi_turn:
            yield next(multi)
        else:
            task, p, a = next(single)
            yield task, p if isinstance(p, list) else [{"role": "user", "content": p}], a


def _row_kind(task: str, messages: list) -> str:
    """Which batches a row goes to: rows of one kind have similar lengths, so a batch pads little."""
    return "long" if task in BLOCKWISE else "multi" if len(messages) > 1 else "short"


def same_last_digit_cuts(r: list[int]) -> list[int]:
    """Where count answer `r` (ids, three-digit numbers a space apart, then EOS) can be cut right after an
    earlier number whose last digit is the last number's: the cuts a model comparing last digits stops at."""
    w = NUMBER_TOKENS
    return [w * i + w - 1 for i in range(len(r) // w - 1) if r[w * i + w - 2] == r[-2]]


def _end_cut(r: list[int], rng) -> int:
    """Where an end row is cut in answer `r` (ids, three-digit numbers a space apart, then EOS): right after
    its last number (the end: EOS next) half the time; otherwise after an earlier number, 1-7 before the
    end or, as often, one whose last digit is the last number's (where a match of the last digit alone
    would stop)."""
    w = NUMBER_TOKENS
    n, end, u = len(r) // w, len(r) - 1, rng.random()
    if u < 0.5 or n < 2:
        return end
    same = same_last_digit_cuts(r)
    if u < 0.75 or not same:
        return end - w * int(rng.integers(1, min(7, n - 1) + 1))
    return same[int(rng.integers(0, len(same)))]


def batches(
    tok,
    seed: int,
    batch: int,
    block: int,
    tasks=None,
    max_area: int = 0,
    multi_turn: float = 0.0,
    first_block: float = 0.0,
    last_block: float = 0.0,
    end_rows: float = 0.0,
):
    """(ids, answer, valid, prompt_maskable, masked_from) batches of one kind of row each (short single
    turns, conversations, long answers), so a short row is not padded to a long one's length.

    Short rows and conversations are laid out like a fixed canvas: the chat-templated messages, then an
    answer area holding the answer, one EOS and EOS padding (LLaDA's SFT: the padding EOS count as answer,
    so the model learns to fill a canvas's tail with EOS). With `max_area` > `block` each batch draws its
    area's length log-uniformly from [block / 2, max_area], so a fixed canvas of any of those lengths
    (exact mode's 128, say) is in distribution.

    Long answers (demo_tasks.BLOCKWISE) are laid out like the growing canvas decodes them, one block at a time:
    the messages, the answer's first k blocks as written, then block k (the answer's tokens there, its EOS
    and EOS padding to `block`); k is drawn once a batch: 0 with probability `first_block` (the block that
    reads the prompt alone), each row's last block (where its EOS is) with probability `last_block`, and
    otherwise uniformly up to the batch's longest answer, a shorter answer taking its last block in its
    place. Only block k is answer (maskable); nothing follows it, as nothing follows the current block on
    a growing canvas.
    With probability `end_rows` a long batch is of end decisions instead: each row is cut right after one
    of its numbers (`_end_cut`), the block holding the cut is the area, written up to the cut and masked
    from there (`masked_from`, the area index; -1 elsewhere: random masking). Half the rows are cut where
    the answer ends (the next token is EOS), the others before (the next is a space): the only way to tell
    is to compare the number just written with the prompt's end, since nothing to the right is visible to
    give the end away.

    Rows are right-padded to the batch's longest with `valid` = 0 (key-masked, no loss); `prompt_maskable`
    (per row) is False for long rows, whose written blocks stay as the decoder left them.
    Tokenizes 64 batches' worth of rows at a time with the Rust batch encoder (the per-example loop
    starved a GPU)."""
    gen = draw_items(seed, tasks or TASKS, multi_turn)
    lo, hi = (block // 2, max_area) if max_area > block else (block, block)
    rng = np.random.default_rng(seed)
    pending: dict[str, list] = {"short": [], "multi": [], "long": []}
    while True:
        items = [next(gen) for _ in range(batch * 64)]
        prompts = [render(m) for _, m, _ in items]
        qs = tok.encode_batch(prompts)
        fs = tok.encode_batch([p + a for p, (_, _, a) in zip(prompts, items)])
        for (task, m, _), q, f in zip(items, qs, fs):
            kind = _row_kind(task, m)
            pending[kind].append((q.ids, f.ids[len(q.ids) :] + [EOS]))
            if len(pending[kind]) < batch:
                continue
            chunk, pending[kind] = pending[kind], []
            cuts = np.full(batch, -1, dtype=np.int64)
            if kind == "long":
                # top and u are drawn for every long batch, end batches too, so the draws (and the rows) of a
                # run without end rows stay as they were
                top, u = int(rng.integers(0, max(-(-len(r) // block) for _, r in chunk))), rng.random()
                at = [_end_cut(r, rng) for _, r in chunk] if end_rows and rng.random() < end_rows else None
                if at is None and u < first_block:
                    top = 0
                elif at is None and u < first_block + last_block:
                    top = max(len(r) for _, r in chunk)  # past every row's last block: each takes its last
                rows = []
                for j, (q, r) in enumerate(chunk):
                    if at is None:
                        k = min(top, -(-len(r) // block) - 1)  # one k a batch (little padding), within the row
                    else:  # an end decision: the block holding the cut, masked from it
                        k = at[j] // block
                        cuts[j] = at[j] - block * k
                    cur = r[block * k : block * (k + 1)]
                    rows.append((q + r[: block * k], cur + [EOS] * (block - len(cur))))
                area = block
            else:
                area = min(hi, int(np.exp(rng.uniform(np.log(lo), np.log(hi + 1)))))  # log-uniform on [lo, hi]
                rows = [(q, (r + [EOS] * area)[:area]) for q, r in chunk]
            width = max(len(q) for q, _ in rows) + area
            ids = np.full((batch, width), EOS, dtype=np.int64)
            answer = np.zeros((batch, width), dtype=bool)
            valid = np.zeros((batch, width), dtype=bool)
            for j, (q, r) in enumerate(rows):
                ids[j, : len(q) + area] = q + r
                answer[j, len(q) : len(q) + area] = True
                valid[j, : len(q) + area] = True
            yield ids, answer, valid, np.full(batch, kind != "long"), cuts
