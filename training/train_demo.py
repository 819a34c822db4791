"""Train the bundled demo model: a small iLLaDA-layout masked-diffusion model (PyTorch) on the synthetic mix.

    pip install -e ".[train]"; python -m training.train_demo --out /tmp/demo --minutes 6     (CUDA if present)

The bundled model is a chain of runs of this script, each from the one before (`--init DIR` continues from
a checkpoint); the commands, seeds, times, losses and probe accuracies are in
illada_mlx/demo_model/train_log.json, and training/README.md says how to reproduce it.
PyTorch because the released model is PyTorch too; the model is written from the spec in torch_ref.py
with iLLaDA's tensor names, so the checkpoint is exactly what the real model's checkpoints look like to
the converter.

Objective (spec §4): t ~ U(ε, 1), mask every token with probability t, cross-entropy on the masked
positions (weighted 1/t with --inv-t; see loss_fn for why the default is the plain mean). iLLaDA SFT
style: prompt and answer are both maskable (a share of rows mask the answer only, --answer-only); one
example per row, ending with EOS and EOS-padded (LLaDA's SFT), so that a masked answer never has to find
which of several prompts in its row is its own (training/README.md).
Writes an HF-format iLLaDA checkpoint (config.json with iLLaDA's keys, fp32 safetensors with iLLaDA's
tensor names, a BPE tokenizer.json with <[MASK]> = 5 and EOS = 2, tokenizer_config.json with a chat
template) plus train_log.json (command, seed, time, losses, held-out probe accuracy per task).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

from training.demo_tasks import (
    BLOCKWISE,
    COUNTS,
    EVERY,
    NUMBER_TOKENS,
    ORDERED,
    TASKS,
    examples,
    held_out_conversations,
    held_out_set,
)
from training.train_rows import EOS, MASK, TEMPLATE, batches, chat_prompt, render, same_last_digit_cuts

# torch_ref by path, not through the illada_mlx package (whose __init__ imports MLX): the trainer also
# runs where only PyTorch is installed, e.g. the lent CUDA machine
_spec = importlib.util.spec_from_file_location(
    "torch_ref", Path(__file__).resolve().parents[1] / "illada_mlx" / "torch_ref.py"
)
torch_ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(torch_ref)
TorchIllada, init_weights, official_generate = (
    torch_ref.TorchIllada,
    torch_ref.init_weights,
    torch_ref.official_generate,
)

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<[MASK]>", "<think>", "</think>"]
LONG_CANVAS = 256  # the growing canvas's budget for long answers (every one and its EOS fit)


def build_tokenizer(out: Path, seed: int, vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    # every letter, digit and space is its own pre-token, so a letter is one and the same token
    # everywhere (byte-level BPE would make "a" and " a" different tokens); merges only join punctuation
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[A-Za-z0-9 ]"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    gen = examples(seed + 1)
    corpus = [chat_prompt(p) + a for _, p, a in (next(gen) for _ in range(20000))]
    tok.train_from_iterator(corpus, trainer)
    assert tok.token_to_id("<[MASK]>") == MASK and tok.token_to_id("</s>") == EOS
    tok.save(str(out / "tokenizer.json"))
    write_tokenizer_config(out)
    return tok


def write_tokenizer_config(out: Path):
    tc = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": False,
        "add_eos_token": False,
        "chat_template": TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "added_tokens_decoder": {
            str(i): {
                "content": s,
                "special": True,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
            }
            for i, s in enumerate(SPECIALS)
        },
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))


def mixed(plain, shaped, share: float, seed: int):
    """Endless batches: from `shaped` a `share` of the time (a coin per batch), else from `plain`."""
    coin = random.Random(seed)
    while True:
        yield next(shaped if coin.random() < share else plain)


class Batches(torch.utils.data.IterableDataset):
    """`batches` in DataLoader worker processes (worker k draws from seed + 1000 k; the DataLoader's
    round-robin order keeps a run reproducible for a given --workers)."""

    def __init__(self, tok_file: str, seed: int, structured: float = 0.0, **layout):
        """layout: `batches`' keyword arguments (batch, block, tasks, max_area, multi_turn, ...); a
        `structured` share of the batches are tool_tasks' template rows instead."""
        super().__init__()
        self.tok_file, self.seed, self.structured, self.layout = tok_file, seed, structured, layout

    def __iter__(self):
        from tokenizers import Tokenizer

        info = torch.utils.data.get_worker_info()
        seed = self.seed + 1000 * (info.id if info else 0)
        tok = Tokenizer.from_file(self.tok_file)
        plain = batches(tok, seed, **self.layout)
        if not self.structured:
            return (tuple(map(torch.from_numpy, b)) for b in plain)
        from training.tool_tasks import template_batches

        shaped = template_batches(tok, seed + 3, self.layout["batch"], render)
        return (tuple(map(torch.from_numpy, b)) for b in mixed(plain, shaped, self.structured, seed + 5))


@torch.no_grad()
def variable_generate(model, prompt, block: int = 32, max_blocks: int = 8):
    """iLLaDA's growing canvas at temperature 0 (the samplers' variable mode): append `block` masks, commit
    one token per step, the most confident masked one (low-confidence remasking), until every row has an
    EOS after its prompt or `max_blocks` blocks are written. Nothing past the current block is on the
    canvas, unlike official_generate's fixed one."""
    x, rows = prompt, torch.arange(prompt.shape[0], device=prompt.device)
    for _ in range(max_blocks):
        x = torch.cat([x, torch.full((x.shape[0], block), MASK, dtype=x.dtype, device=x.device)], 1)
        for _ in range(block):
            conf, x0 = torch.softmax(model(x).float(), -1).max(-1)
            pos = torch.where(x == MASK, conf, -1.0).argmax(-1)
            x[rows, pos] = x0[rows, pos]
        if (x[:, prompt.shape[1] :] == EOS).any(-1).all():
            break
    return x


@torch.no_grad()
def held_out_accuracy(model, tok, items, block: int = 32, canvas: int = 0, variable: bool = False) -> dict:
    """Exact mode in torch (one token per step over a `canvas`-token canvas, `block` by default, in
    semi-AR blocks of `block` like the samplers; low-confidence remasking; answer = text before the first
    EOS), or with `variable` the growing canvas of at most `canvas` tokens (variable_generate), per task,
    on held-out items (task, prompt or messages, answer); rows bucketed by prompt length."""
    canvas = canvas or block
    model.eval()
    dev = next(model.parameters()).device
    buckets: dict[int, list] = {}
    for task, p, a in items:
        ids = tok.encode(render(p if isinstance(p, list) else [{"role": "user", "content": p}])).ids
        buckets.setdefault(len(ids), []).append((task, ids, a))
    score = {}
    for n, rows in buckets.items():
        prompt = torch.tensor([r[1] for r in rows], device=dev)
        if variable:
            x = variable_generate(model, prompt, block, canvas // block)
        else:
            x, _ = official_generate(model, prompt, steps=canvas, gen_length=canvas, block_length=block, mask_id=MASK)
        for (task, _, a), out in zip(rows, x[:, n:].tolist()):
            out = out[: out.index(EOS)] if EOS in out else out
            ok = tok.decode(out).strip() == a
            score.setdefault(task, []).append(ok)
    model.train()
    return {t: round(sum(v) / len(v), 3) for t, v in sorted(score.items())}


@torch.no_grad()
def order_probe(model, tok, items, block: int = 32) -> dict:
    """Does the model read the answer digits it has committed? For the ORDERED tasks' answers (demo_tasks:
    sums, parity), the teacher-forced accuracy on the digits 2 or more from the right end (each a sum or
    XOR of 3+ list items from the prompt alone, but one step from its right-hand neighbour): with only
    that digit masked, and with every answer digit masked. Decoding order can only matter once the first
    beats the second."""
    model.eval()
    dev = next(model.parameters()).device
    hits = {"neighbours_visible": [], "all_masked": []}
    for _, p, a in items:
        q = tok.encode(chat_prompt(p)).ids
        r = tok.encode(chat_prompt(p) + a).ids[len(q) :]
        row = torch.tensor(q + r + [EOS] * (block - len(r)), device=dev)
        digits = [len(q) + i for i, t in enumerate(r) if tok.id_to_token(t).isdigit()]
        for name, hit in hits.items():
            x = row.repeat(len(digits) - 2, 1)
            for j, pos in enumerate(digits[:-2]):
                x[j, [pos] if name == "neighbours_visible" else digits] = MASK
            logits = model(x)[torch.arange(len(x)), digits[:-2]]
            logits[:, MASK] = float("-inf")
            hit += (logits.argmax(-1) == row[digits[:-2]]).tolist()
    model.train()
    return {k: round(sum(v) / len(v), 3) for k, v in hits.items()}


@torch.no_grad()
def end_probe(model, tok, items, block: int = 32) -> dict:
    """Does the model know where a count ends? For count items (three-digit numbers), the answer written up
    to a number and masked from there to the end of that number's block (the earlier blocks in place), as
    train_rows' end rows: P(EOS) next when that number is the prompt's b ("end"), when it is the number
    before b and in the last block ("not_end"), and when it is the last earlier number whose last digit is
    b's ("same_last_digit", where a model comparing only last digits stops). Per task: the mean P(EOS) of
    each; the share of end and not_end decided right (P > 0.5 at the end, < 0.5 before it); and the share
    of same_last_digit cuts where the model would stop ("stops_at_last_digit"). Equal means: the model
    cannot tell them apart."""
    model.eval()
    dev = next(model.parameters()).device
    w = NUMBER_TOKENS
    out = {}
    for task in dict.fromkeys(t for t, _, _ in items):
        p_eos = {"end": [], "not_end": [], "same_last_digit": []}
        for _, p, a in (it for it in items if it[0] == task):
            q = tok.encode(chat_prompt(p)).ids
            r = tok.encode(chat_prompt(p) + a).ids[len(q) :] + [EOS]
            last = block * ((len(r) - 1) // block)
            cuts = [("end", len(r) - 1)] + ([("not_end", len(r) - 1 - w)] if len(r) - 1 - w >= last else [])
            for name, cut in cuts + [("same_last_digit", c) for c in same_last_digit_cuts(r)[-1:]]:
                top = block * (cut // block) + block
                x = torch.tensor([q + r[:cut] + [MASK] * (top - cut)], device=dev)
                logits = model(x)[0, len(q) + cut]
                logits[MASK] = float("-inf")
                p_eos[name].append(torch.softmax(logits, -1)[EOS].item())
        right = [v > 0.5 for v in p_eos["end"]] + [v < 0.5 for v in p_eos["not_end"]]
        out[task] = {
            **{k: round(sum(v) / max(len(v), 1), 3) for k, v in p_eos.items()},
            "decided_right": round(sum(right) / max(len(right), 1), 3),
            "stops_at_last_digit": round(
                sum(v > 0.5 for v in p_eos["same_last_digit"]) / max(len(p_eos["same_last_digit"]), 1), 3
            ),
        }
    model.train()
    return out


def loss_fn(
    model,
    x,
    answer,
    valid,
    prompt_maskable=None,
    t_min=1e-3,
    answer_only=0.8,
    inv_t=False,
    pad_weight=1.0,
    eos_weight=1.0,
    masked_from=None,
):
    """t ~ U(t_min, 1) (the spec's ε by default); mask each maskable token with probability t; cross-entropy
    on the masked tokens. iLLaDA SFT masks prompt and answer alike; here a fifth of the rows do that and the
    rest mask the answer only (LLaDA's SFT); rows whose `prompt_maskable` is False (long answers' blocks)
    always mask the answer only. The spec weights each masked token by 1/t (`inv_t`); at this
    tiny scale the plain mean over masked tokens learned measurably faster (recall 38% vs ~20% one-shot
    after 400 vs 1000 steps), so it is the default here. `pad_weight` weighs the EOS padding after an
    answer's own EOS (LLaDA's SFT: 1, like any token); with t_min = 1 and pad_weight = 0 a row is the
    answer-from-prompt classification a one-digit answer needs to leave its plateau (training/README.md).
    `eos_weight` weighs the answer's own EOS (the one place a long answer learns where it ends).
    `masked_from` (per row, -1: random masking): rows whose answer area is masked from this index on and
    visible before it (train_rows' end decisions)."""
    B, L = x.shape
    t = torch.rand(B, 1, device=x.device) * (1 - t_min) + t_min
    whole = torch.rand(B, 1, device=x.device) >= answer_only
    if prompt_maskable is not None:
        whole = whole & prompt_maskable.view(B, 1)
    maskable = torch.where(whole, valid, answer)
    masked = (torch.rand(B, L, device=x.device) < t) & maskable & valid
    if masked_from is not None:
        start = answer.float().argmax(1, keepdim=True)  # each row's area start
        cut = torch.arange(L, device=x.device) >= start + masked_from.view(B, 1)
        masked = torch.where(masked_from.view(B, 1) >= 0, answer & valid & cut, masked)
    logits = model(torch.where(masked, MASK, x), attention_mask=valid)
    ce = torch.nn.functional.cross_entropy(logits.reshape(B * L, -1), x.reshape(-1), reduction="none").view(B, L)
    keep = masked.float()
    after_eos = torch.roll(x, 1, dims=1) == EOS
    if pad_weight != 1.0:  # padding: an EOS right after an EOS inside the answer area
        keep = torch.where(answer & (x == EOS) & after_eos, keep * pad_weight, keep)
    if eos_weight != 1.0:  # the answer's own EOS: the first in its area
        keep = torch.where(answer & (x == EOS) & ~after_eos, keep * eos_weight, keep)
    w = keep / t if inv_t else keep
    return (ce * w).sum() / keep.sum().clamp(min=1e-6)


def save_checkpoint(model: TorchIllada, out: Path):
    from safetensors.torch import save_file

    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (out / "config.json").write_text(json.dumps(model.config, indent=2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="illada_mlx/demo_model")
    ap.add_argument(
        "--steps",
        type=int,
        default=5000,
        help="0: no training, only the probe (of --init's weights, with the --tasks / --multi-turn mix)",
    )
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--block", type=int, default=32, help="answer positions per row (the decode block)")
    ap.add_argument(
        "--max-area",
        type=int,
        default=0,
        help="draw each batch's answer area from block/2 .. this (log-uniform), so fixed canvases of "
        "those lengths decode; 0 = always --block",
    )
    ap.add_argument("--inv-t", action="store_true", help="weight masked tokens by 1/t (the spec's objective)")
    ap.add_argument(
        "--t-min",
        type=float,
        default=1e-3,
        help="draw the mask rate t from [this, 1] (the spec's ε); 1 masks every maskable token",
    )
    ap.add_argument(
        "--pad-weight",
        type=float,
        default=1.0,
        help="loss weight of the EOS padding after an answer's own EOS (LLaDA's SFT: 1)",
    )
    ap.add_argument("--answer-only", type=float, default=0.8, help="share of rows that mask the answer only")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--d", type=int, default=192)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=320)
    ap.add_argument(
        "--tasks",
        default=",".join(TASKS),
        help=f"comma-separated, from {','.join(EVERY)}; a repeat weights a task",
    )
    ap.add_argument(
        "--multi-turn",
        type=float,
        default=0.0,
        help="share of rows that are conversations: 1-4 earlier exchanges, the last turn from --tasks",
    )
    ap.add_argument(
        "--first-block",
        type=float,
        default=0.0,
        help="share of long-answer batches that train the answer's first block (the rest: uniform)",
    )
    ap.add_argument(
        "--last-block",
        type=float,
        default=0.0,
        help="share of long-answer batches that train each answer's last block (where it ends)",
    )
    ap.add_argument(
        "--end-rows", type=float, default=0.0, help="share of long-answer batches of end decisions (train_rows.batches)"
    )
    ap.add_argument(
        "--eos-weight",
        type=float,
        default=1.0,
        help="loss weight of an answer's own EOS (where it ends; padding: --pad-weight)",
    )
    ap.add_argument(
        "--long-probe",
        type=int,
        default=10,
        help="held-out items per long task (count, countby) in the probe: 256 steps each, so few",
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)), help="data worker processes"
    )
    ap.add_argument("--eval-every", type=int, default=500, help="held-out exact-mode accuracy every N steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--minutes",
        type=float,
        default=24.0,
        help="time budget, probes included: the cosine schedule follows the clock and the run ends "
        "when it is spent (or at --steps); 0 = none (the schedule follows --steps)",
    )
    ap.add_argument(
        "--structured",
        type=float,
        default=0.0,
        help="share of batches that are structured-output template rows (training/tool_tasks.py)",
    )
    ap.add_argument("--init", default=None, help="start from this checkpoint dir (same shape) instead of random")
    ap.add_argument("--tokenizer", default=None, help="reuse this tokenizer.json instead of training one")
    a = ap.parse_args()
    tasks = tuple(a.tasks.split(","))
    if set(tasks) - set(EVERY):
        ap.error(f"unknown task(s) {sorted(set(tasks) - set(EVERY))}: use {','.join(EVERY)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(a.seed)
    if a.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    if a.tokenizer:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(a.tokenizer)
        (out / "tokenizer.json").write_text(Path(a.tokenizer).read_text())
        write_tokenizer_config(out)
    else:
        tok = build_tokenizer(out, a.seed, a.vocab)
    config = {
        "architectures": ["ILLaDAForCausalLM"],
        "model_type": "illada",
        "hidden_size": a.d,
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "intermediate_size": a.ffn,
        "vocab_size": tok.get_vocab_size(),
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": EOS,
        "pad_token_id": EOS,
        "torch_dtype": "float32",
    }
    model = TorchIllada(config)
    init_weights(model, a.seed)
    if a.init:  # a run of the chain starts from an earlier run's checkpoint (train_log.json records both)
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(Path(a.init) / "model.safetensors")))
    model.to(a.device)
    n_params = sum(p.numel() for p in model.parameters())
    warm = max(1, min(200, a.steps // 10))
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.98))

    def lr_at(i: int, done: float) -> float:
        """Linear warm-up over `warm` steps, then cosine from --lr to 5% of it as `done` goes 0 -> 1."""
        return a.lr * min(1.0, (i + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0))))

    rows = Batches(
        str(out / "tokenizer.json"),
        a.seed,
        structured=a.structured,
        batch=a.batch,
        block=a.block,
        tasks=tasks,
        max_area=a.max_area,
        multi_turn=a.multi_turn,
        first_block=a.first_block,
        last_block=a.last_block,
        end_rows=a.end_rows,
    )
    data = iter(
        torch.utils.data.DataLoader(rows, batch_size=None, num_workers=a.workers, pin_memory=a.device == "cuda")
    )
    # probes: not the bench's held-out items (other seeds); long answers in variable mode, few of them
    short = tuple(t for t in dict.fromkeys(tasks) if t not in BLOCKWISE)
    probe = held_out_set(25, seed=999, tasks=short) + (held_out_conversations(10, seed=999) if a.multi_turn else [])
    long_probe = held_out_set(a.long_probe, seed=999, tasks=tuple(t for t in dict.fromkeys(tasks) if t in BLOCKWISE))
    counts = held_out_set(10, seed=999, tasks=tuple(t for t in dict.fromkeys(tasks) if t in COUNTS))
    ordered_probe = [it for it in probe if it[0] in ORDERED]

    def probe_all(n_long=None):
        """The probe: short tasks and conversations on a --block canvas, long tasks (the first n_long of
        each) in variable mode up to LONG_CANVAS tokens, the mode their target is set in."""
        acc = held_out_accuracy(model, tok, probe, a.block)
        if long_probe:
            by_task = {}
            for it in long_probe:
                by_task.setdefault(it[0], []).append(it)
            acc.update(
                held_out_accuracy(
                    model, tok, [x for v in by_task.values() for x in v[:n_long]], a.block, LONG_CANVAS, variable=True
                )
            )
        return acc

    t0, log, ema = time.time(), [], None
    i = 0
    while i < a.steps:
        # the share of the run done: of the clock with --minutes (a run sharing its machine still ends on
        # time, its schedule complete), else of the steps
        done = (time.time() - t0) / (a.minutes * 60) if a.minutes else i / a.steps
        if done >= 1:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(i, done)
        x, answer, valid, maskable, masked_from = (t.to(a.device, non_blocking=True) for t in next(data))
        loss = loss_fn(
            model,
            x,
            answer,
            valid,
            maskable,
            answer_only=a.answer_only,
            inv_t=a.inv_t,
            t_min=a.t_min,
            pad_weight=a.pad_weight,
            eos_weight=a.eos_weight,
            masked_from=masked_from,
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if i % 50 == 0:
            ema = loss.item() if ema is None else 0.6 * ema + 0.4 * loss.item()
            el = time.time() - t0
            row = {"step": i, "loss_ema": round(ema, 4), "seconds": round(el, 1)}
            if a.eval_every and i % a.eval_every == 0 and i:
                row["held_out"] = probe_all(n_long=4)
                if ordered_probe:
                    row["order_probe"] = order_probe(model, tok, ordered_probe, a.block)
                if counts:
                    row["end_probe"] = end_probe(model, tok, counts, a.block)
            log.append(row)
            print(json.dumps(row), flush=True)
        if i and i % 1000 == 0:
            save_checkpoint(model, out)
        i += 1
    save_checkpoint(model, out)
    final = probe_all()
    longest = {}  # and on the longest fixed canvas trained for, in blocks of --block as the samplers decode it
    if a.max_area > a.block:
        longest[f"held_out_probe_canvas_{a.max_area}"] = held_out_accuracy(
            model, tok, [it for it in probe if it[0] in TASKS], a.block, a.max_area
        )
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"{torch.get_num_threads()}-thread CPU"
    info = {
        "command": " ".join(sys.argv),
        "seed": a.seed,
        "steps": i,
        "params": n_params,
        "seconds": round(time.time() - t0, 1),
        "final_loss_ema": None if ema is None else round(ema, 4),
        "held_out_probe": final,
        **longest,
        **({"order_probe": order_probe(model, tok, ordered_probe, a.block)} if ordered_probe else {}),
        **({"end_probe": end_probe(model, tok, counts, a.block)} if counts else {}),
        "log": log,
        "machine": f"{a.device}: {where}, PyTorch {torch.__version__}",
    }
    (out / "train_log.json").write_text(json.dumps(info, indent=2))
    print(json.dumps({k: v for k, v in info.items() if k != "log"}))


if __name__ == "__main__":
    main()
