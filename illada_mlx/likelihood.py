"""Likelihood scoring, the official way (LLaDA's `get_log_likelihood` and `suffix_greedy_prediction`).

log_likelihood: a Monte-Carlo estimate of the masked-diffusion bound on log p(answer | prompt). mc_num
samples in groups of batch_size; a group draws one random start k in [1, L] and spreads the mask counts
evenly over its rows (x_i = round(k + i·L/b), wrapped into [1, L]), each row masking x_i random answer
positions. A row's loss is the cross-entropy summed over its masked positions divided by the mask ratio
x_i / L; the estimate is minus the mean over all rows. With cfg_scale > 0 an unconditional copy of each
row has the prompt masked and the logits are un + (cfg + 1)(cond − un).

greedy_check: does greedy decoding of the masked answer reproduce it? One position per forward, the most
confident masked position takes its argmax, until the answer is filled.

Both run many (prompt, answer) requests at once: rows of different requests share a forward, left-padded.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

from .config import ContextError, IlladaError
from .decode import left_pad

CHUNK_FORWARDS = 256  # the eval commands score requests in chunks of about this many forwards


def chunk_size(mc_num: int, batch_size: int) -> int:
    """Requests per chunk: each takes mc_num / batch_size forwards."""
    return max(1, CHUNK_FORWARDS // max(mc_num // batch_size, 1))


@dataclass
class Scored:
    """A request's estimate and the masks it drew, (mc_num, len(answer)) booleans in sampling order."""

    log_likelihood: float
    masks: np.ndarray


def draw_masks(rng: np.random.Generator, rows: int, length: int) -> np.ndarray:
    """One group of the official forward_process: (rows, length) booleans, row i masking x_i positions."""
    k = int(rng.integers(1, length + 1))
    x = np.round(np.linspace(float(k), k + (rows - 1) * (length / rows), rows)).astype(np.int64)
    x = ((x - 1) % length) + 1
    masks = np.arange(length)[None, :] < x[:, None]
    for i in range(rows):
        masks[i] = masks[i][rng.permutation(length)]
    return masks


def _pad(args) -> int:
    return args.pad_token_id if args.pad_token_id is not None else (args.eos_token_id or 0)


def _check(model, pairs, mc_num: int, batch_size: int) -> None:
    if mc_num < 1 or batch_size < 1 or mc_num % batch_size:
        raise IlladaError(
            f"mc_num ({mc_num}) must be a positive multiple of batch_size ({batch_size}), as in the official estimator"
        )
    limit = model.args.max_position_embeddings
    for prompt, answer in pairs:
        if len(answer) == 0:
            raise IlladaError("empty answer: there is nothing to score")
        if len(prompt) + len(answer) > limit:
            raise ContextError(
                f"prompt ({len(prompt)}) + answer ({len(answer)}) tokens is more than the model's "
                f"{limit} positions; shorten them"
            )


def _logits(
    model, rows: list[list[int]], prompt_lens: list[int], at: mx.array, cfg_scale: float, mask_id: int, pad_id: int
):
    """Logits (R, K, V) at the last-K positions `at` of left-padded rows, with the official CFG."""
    x, valid = left_pad(rows, pad_id)
    if cfg_scale > 0:
        P = x.shape[1]
        starts = mx.array([P - len(r) for r in rows])[:, None]
        ends = starts + mx.array(prompt_lens)[:, None]
        pos = mx.arange(P)[None, :]
        un = mx.where((pos >= starts) & (pos < ends), mask_id, x)
        x = mx.concatenate([x, un])
        valid = None if valid is None else mx.concatenate([valid, valid])
    logits = model(x, valid, logits_at=at).astype(mx.float32)
    if cfg_scale > 0:
        cond, un = logits[: len(rows)], logits[len(rows) :]
        logits = un + (cfg_scale + 1) * (cond - un)
    return logits


def log_likelihoods(
    model,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    mc_num: int = 128,
    batch_size: int = 32,
    cfg_scale: float = 0.0,
    seed: Optional[int] = None,
    masks: Optional[list[np.ndarray]] = None,
) -> list[Scored]:
    """The official estimate for each (prompt ids, answer ids) pair; deterministic for a seed (each request
    draws from a stream seeded by the seed and its own tokens, so it scores the same alone, batched or in
    another order). masks: use these (mc_num, len(answer)) draws instead."""
    a = model.args
    pairs = [(list(map(int, p)), list(map(int, q))) for p, q in pairs]
    _check(model, pairs, mc_num, batch_size)
    if masks is None:
        masks = []
        for prompt, answer in pairs:
            tag = zlib.crc32(np.array(prompt + [-1] + answer, dtype=np.int64).tobytes())
            rng = np.random.default_rng(None if seed is None else [seed, tag])
            masks.append(
                np.concatenate([draw_masks(rng, batch_size, len(answer)) for _ in range(mc_num // batch_size)])
            )
    pad = _pad(a)
    rows = [(j, i) for j in range(len(pairs)) for i in range(mc_num)]
    total = np.zeros(len(pairs))
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        K = max(len(pairs[j][1]) for j, _ in chunk)
        canvases, plens, targets, weights = [], [], [], []
        for j, i in chunk:
            prompt, answer = pairs[j]
            m = masks[j][i]
            canvases.append(prompt + [a.mask_token_id if mi else t for t, mi in zip(answer, m)])
            plens.append(len(prompt))
            pad_k = K - len(answer)
            targets.append([0] * pad_k + answer)
            weights.append([0.0] * pad_k + list(m / (m.sum() / len(answer))))  # 1 / mask ratio where masked
        P = max(len(c) for c in canvases)
        logits = _logits(model, canvases, plens, mx.arange(P - K, P), cfg_scale, a.mask_token_id, pad)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        nll = -mx.take_along_axis(logp, mx.array(targets)[..., None], axis=-1)[..., 0]
        loss = np.array((nll * mx.array(weights, dtype=mx.float32)).sum(-1), dtype=np.float64)
        for (j, _), value in zip(chunk, loss):
            total[j] += value
    return [Scored(-float(t) / mc_num, m) for t, m in zip(total, masks)]


def log_likelihood(
    model,
    prompt_ids: Sequence[int],
    answer_ids: Sequence[int],
    mc_num: int = 128,
    batch_size: int = 32,
    cfg_scale: float = 0.0,
    seed: Optional[int] = None,
) -> float:
    """The official estimate of log p(answer | prompt) (see log_likelihoods)."""
    return log_likelihoods(model, [(prompt_ids, answer_ids)], mc_num, batch_size, cfg_scale, seed)[0].log_likelihood


def greedy_answers(model, pairs: Sequence[tuple[Sequence[int], int]], cfg_scale: float = 0.0) -> list[list[int]]:
    """The official suffix greedy decoding of `length` masked positions after each prompt: one position per
    forward, the most confident masked one taking its argmax."""
    a = model.args
    pad = _pad(a)
    prompts = [list(map(int, p)) for p, _ in pairs]
    lengths = [int(n) for _, n in pairs]
    _check(model, [(p, [0] * n) for p, n in zip(prompts, lengths)], 1, 1)
    K = max(lengths)
    answers = [[a.mask_token_id] * n for n in lengths]
    for _ in range(K):
        canvases = [p + q for p, q in zip(prompts, answers)]
        P = max(len(c) for c in canvases)
        logits = _logits(
            model, canvases, [len(p) for p in prompts], mx.arange(P - K, P), cfg_scale, a.mask_token_id, pad
        )
        probs = mx.softmax(logits, axis=-1)
        x0 = np.array(mx.argmax(logits, axis=-1))
        conf = np.array(mx.take_along_axis(probs, mx.array(x0)[..., None], axis=-1)[..., 0], dtype=np.float64)
        for r, answer in enumerate(answers):
            off = K - len(answer)
            masked = [i for i, t in enumerate(answer) if t == a.mask_token_id]
            if masked:
                best = max(masked, key=lambda i: conf[r, off + i])
                answer[best] = int(x0[r, off + best])
    return answers


def greedy_check(model, prompt_ids: Sequence[int], answer_ids: Sequence[int], cfg_scale: float = 0.0) -> bool:
    """The official `suffix_greedy_prediction`: does greedy decoding of the masked answer reproduce it?"""
    answer = list(map(int, answer_ids))
    return greedy_answers(model, [(prompt_ids, len(answer))], cfg_scale)[0] == answer
