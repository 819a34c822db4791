"""The quality yardstick's scoring: exact match of the decoded answer on the held-out task mix, per sampler.

bench/quality.py runs it over float and quantized conversions and writes the table. Rows: exact mode (1
token per step: low-confidence remasking, random remasking, and strictly left to right through 1-token
blocks), variable length, fast mode (τ = 0.9 + prefix cache), and the model's default (SAMPLERS).
"turn<k>" scores the answer to the k-th user turn of a conversation whose earlier k-1 exchanges are correct
(the held-out split is the last turn's, demo_tasks); the long tasks (67-255 token answers, 3-8 blocks) are
scored with a 256-token canvas or budget (`score_long`): whole-answer exact match, the position of the
first wrong token, and whether the answer ended (EOS) in its own block rather than at the budget.
"""

from __future__ import annotations

import time

import mlx.core as mx

from illada_mlx.decode import Step, decode, run
from illada_mlx.engine import build_prompt
from illada_mlx.spec import PRESETS, make_spec

SAMPLERS = {
    # name: (a PRESETS mode, or None for the model's own default mode, and its overrides); blocks of 32 with
    # one step per token unless overridden
    # what a user gets: the model's own defaults (diffusion_config.json), else the fast mode's
    "default": (None, dict(max_tokens=64)),
    # the default without its stable commits (on its own)
    "default_unstable": (None, dict(max_tokens=64, stable_threshold=0.0)),
    # the fast mode's mechanisms one at a time over the plain threshold rule (on their own)
    "fast_t0.9_token_drift": (
        "fast",
        dict(max_tokens=64, rule="threshold", threshold=0.9, cache="token", eos_fill=False),
    ),
    "fast_error0.04_token_window": (
        "fast",
        dict(max_tokens=64, rule="error", error_bound=0.04, cache="token", block_refresh="window", eos_fill=False),
    ),
    "fast_error0.04_token_drift": (
        "fast",
        dict(max_tokens=64, rule="error", error_bound=0.04, cache="token", eos_fill=False),
    ),
    "fast_error0.04_prefix_window": (
        "fast",
        dict(max_tokens=64, rule="error", error_bound=0.04, block_refresh="window", eos_fill=False),
    ),
    "exact": ("exact", dict(max_tokens=32)),
    "exact_random_remask": ("exact", dict(max_tokens=32, remasking="random", seed=0)),
    # the same with other draws of the random order (run on their own: how much the seed moves it)
    **{f"exact_random_remask_seed{s}": ("exact", dict(max_tokens=32, remasking="random", seed=s)) for s in (1, 2)},
    # the official loop with 1-token blocks: one token per step, strictly left to right (an AR order)
    "exact_left_to_right": ("exact", dict(max_tokens=32, block_length=1, steps_per_block=1)),
    # the official defaults' fixed canvas (128 tokens in 4 blocks of 32, one token per step): 96 positions
    # past the answer block, which the model must fill with EOS (4x the forwards; run on its own)
    "exact_canvas128": ("exact", dict(max_tokens=128)),
    "variable": ("variable", dict(max_tokens=64)),
    "fast_t0.9_prefix": (
        "fast",
        dict(max_tokens=64, threshold=0.9, cache="prefix", eos_fill=False, block_refresh="window"),
    ),
    # the same commits without the cache: what the prefix cache's stale prompt states cost (run on its own)
    "fast_t0.9_nocache": (
        "fast",
        dict(max_tokens=64, threshold=0.9, cache="none", eos_fill=False, block_refresh="window"),
    ),
    # the token cache: a step reruns only the masks and the tokens the step before it committed
    "fast_t0.9_token": (
        "fast",
        dict(max_tokens=64, threshold=0.9, cache="token", block_refresh="window", eos_fill=False),
    ),
    # a stricter commit threshold with the same cache: what parallel commits cost on long answers (on its own)
    "fast_t0.99_token": (
        "fast",
        dict(max_tokens=64, threshold=0.99, cache="token", block_refresh="window", eos_fill=False),
    ),
    # the token cache with the whole canvas recomputed at each block start (on its own)
    "fast_t0.9_token_full": (
        "fast",
        dict(max_tokens=64, threshold=0.9, cache="token", block_refresh="full", eos_fill=False),
    ),
    # both: the stricter threshold and the full refresh (on its own)
    "fast_t0.99_token_full": (
        "fast",
        dict(max_tokens=64, threshold=0.99, cache="token", block_refresh="full", eos_fill=False),
    ),
    # blocks of 8, so most answers span several blocks: what each block refresh policy costs (on their own)
    "variable_b8": ("variable", dict(max_tokens=64, block_length=8, steps_per_block=8)),
    "fast_b8_full": (
        "fast",
        dict(max_tokens=64, block_length=8, steps_per_block=8, cache="prefix", block_refresh="full", eos_fill=False),
    ),
    "fast_b8_window": (
        "fast",
        dict(max_tokens=64, block_length=8, steps_per_block=8, cache="prefix", block_refresh="window", eos_fill=False),
    ),
    "fast_b8_token": (
        "fast",
        dict(max_tokens=64, block_length=8, steps_per_block=8, cache="token", eos_fill=False, block_refresh="window"),
    ),
}
assert all(mode is None or mode in PRESETS for mode, _ in SAMPLERS.values())
# the rows run without --samplers; every other row runs only when named
DEFAULT_ROWS = ("exact", "exact_random_remask", "exact_left_to_right", "variable", "fast_t0.9_prefix")
assert set(DEFAULT_ROWS) <= set(SAMPLERS)


def sampler_spec(model, tok, sampler: str, **more):
    """The DecodeSpec a sampler row runs (`more`: further overrides, e.g. a longer budget)."""
    mode, over = SAMPLERS[sampler]
    return make_spec(model, tok, mode=mode, **{"block_length": 32, "steps_per_block": 32, **over, **more})


TURNS = ("turn2", "turn3", "turn4")  # multi-turn rows: the answer to the 2nd, 3rd, 4th user turn
LONG_GEN = 256  # canvas / budget for the long answers (answer + EOS fit 8 blocks of 32)


def as_messages(prompt) -> list[dict]:
    """An item's prompt as chat messages: a conversation as it is, a string as one user turn."""
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def first_wrong(got: list[int], want: list[int]):
    """Index of the first token where `got` (the answer, cut at EOS) leaves `want`; None if they are equal.
    An output that stops early is wrong where it stopped, one that runs on is wrong at len(want)."""
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            return i
    return None if len(got) == len(want) else min(len(got), len(want))


class RowForwards:
    """Counts, from a decode's Step events, the forwards each row needed: the steps that committed in it (a
    row whose block is done rides along in the batch's forwards without needing them)."""

    def __init__(self):
        self.n = 0

    def __call__(self, ev) -> None:
        if isinstance(ev, Step):
            self.n += int(mx.any(ev.committed, axis=1).sum())


class Tally:
    """The figures of a row's decodes over the items, batch by batch (`decoded`)."""

    def __init__(self):
        self.nfe = self.processed = self.out_tokens = 0
        self.rows = RowForwards()
        self.t0 = time.perf_counter()

    def decoded(self, model, tok, items, spec, batch: int):
        """(the items of a batch, its Generation), batch after batch, counting each one's figures."""
        for i in range(0, len(items), batch):
            chunk = items[i : i + batch]
            g = run(decode(model, [build_prompt(tok, as_messages(p)) for _, p, _ in chunk], spec), self.rows)
            self.nfe += g.stats.nfe
            self.processed += g.stats.processed
            self.out_tokens += g.stats.output_tokens
            yield chunk, g

    def figures(self) -> dict:
        return {
            "forwards": self.nfe,
            "processed_tokens": self.processed,
            "seconds": round(time.perf_counter() - self.t0, 2),
            "output_tokens": self.out_tokens,
            "row_forwards": self.rows.n,
            "tokens_per_row_forward": self.out_tokens / max(self.rows.n, 1),
            "processed_per_output_token": self.processed / max(self.out_tokens, 1),
        }


def score_long(model, tok, items, sampler: str, batch: int = 10, gen: int = LONG_GEN) -> dict:
    """A sampler of SAMPLERS on long-answer items with a `gen`-token canvas (exact) or budget (variable):
    per task, whole-answer exact match token for token and, per item, the first wrong token's position
    (None: right); `blocks_right`: per task, the share of the answers' blocks (the sampler's) that end before their
    first wrong token (all of a right answer's); `eos_in_its_block`: per task, the share of answers that
    stopped (EOS) in the block where the right answer's EOS is, not earlier, later or at the budget."""
    spec = sampler_spec(model, tok, sampler, max_tokens=gen)
    B = spec.block_length
    per_task: dict[str, list] = {}
    tally = Tally()
    for chunk, g in tally.decoded(model, tok, items, spec, batch):
        for (task, _, answer), toks, why in zip(chunk, g.tokens, g.finish_reasons):
            want = tok.encode(answer, add_special_tokens=False)  # toks: cut before the first EOS
            eos_block = len(toks) // B == len(want) // B and why == "stop"
            per_task.setdefault(task, []).append((first_wrong(list(toks), want), len(want), eos_block))
    n = sum(len(v) for v in per_task.values())
    return {
        "sampler": sampler,
        "gen": gen,
        "n": n,
        "accuracy": sum(w is None for v in per_task.values() for w, _, _ in v) / n,
        "per_task": {t: sum(w is None for w, _, _ in v) / len(v) for t, v in per_task.items()},
        "blocks_right": {
            t: sum(-(-L // B) if w is None else w // B for w, L, _ in v) / sum(-(-L // B) for _, L, _ in v)
            for t, v in per_task.items()
        },
        "eos_in_its_block": {t: sum(e for _, _, e in v) / len(v) for t, v in per_task.items()},
        "first_wrong": {t: [w for w, _, _ in v] for t, v in per_task.items()},
        "answer_tokens": {t: [L for _, L, _ in v] for t, v in per_task.items()},
        **tally.figures(),
    }


def _score(tok, chunk, tokens, per_task: dict, correct: list) -> None:
    """Exact match of each decoded answer (stripped) with its item's, appended in item order."""
    for (task, _, answer), toks in zip(chunk, tokens):
        correct.append(int(tok.decode(toks).strip() == answer))
        per_task.setdefault(task, []).append(correct[-1])


def _summary(sampler: str, per_task: dict, correct: list) -> dict:
    return {
        "sampler": sampler,
        "accuracy": sum(correct) / len(correct),
        "n": len(correct),
        "per_task": {t: sum(v) / len(v) for t, v in per_task.items()},
    }


def evaluate(model, tok, items, sampler: str, batch: int = 50) -> dict:
    spec = sampler_spec(model, tok, sampler)
    per_task, correct = {}, []  # correct: per item, in order: rows on the same items compare prompt by prompt
    tally = Tally()
    for chunk, g in tally.decoded(model, tok, items, spec, batch):
        _score(tok, chunk, g.tokens, per_task, correct)
    return {
        **_summary(sampler, per_task, correct),
        **tally.figures(),
        "forwards_per_batch_of_%d" % batch: tally.nfe / max(1, -(-len(items) // batch)),
        "correct": correct,
    }


def evaluate_chat(model, tok, items, sampler: str, turn_delay: int = 1) -> dict:
    """Conversation items decoded as `illada-mlx chat` decodes them: one session per conversation, a user turn
    at a time, one BlockCache(turn_delay) carried across its turns (the cross-turn cache: a turn reuses what
    earlier calls computed of the history, as far as it matches the canvas; with turn_delay 0 the previous
    turn's prompt and reply too, cache.py). Row name: <sampler>_chat, or <sampler>_chat_delay0.
    The earlier replies in the history are the item's correct ones, as in `evaluate`; the last turn's reply
    is scored. `processed_tokens` counts the last turns; `processed_tokens_all_turns` every turn's."""
    from illada_mlx.cache import BlockCache

    spec = sampler_spec(model, tok, sampler)
    per_task, correct, turns = {}, [], []
    nfe = processed = processed_all = 0
    t0 = time.perf_counter()
    for item in items:
        messages, cache = item[1], BlockCache(turn_delay)
        for j in range(1, len(messages) + 1, 2):  # each user turn, the last one included
            g = run(decode(model, [build_prompt(tok, messages[:j])], spec, cache=cache))
            processed_all += g.stats.processed
        turns.append((j + 1) // 2)
        nfe += g.stats.nfe
        processed += g.stats.processed
        _score(tok, [item], g.tokens, per_task, correct)
    return {
        **_summary(sampler + "_chat" + ("" if turn_delay == 1 else f"_delay{turn_delay}"), per_task, correct),
        "turn_delay": turn_delay,
        "forwards": nfe,
        "processed_tokens": processed,
        "processed_tokens_all_turns": processed_all,
        "seconds": round(time.perf_counter() - t0, 2),
        "correct": correct,
        "turns_decoded": turns,
    }
