"""What generate / chat / serve / bench share: per-model defaults, modes as sampler options, prompts.

Modes (each a set of options of the one decode loop):
  exact     the official fixed canvas: gen_length = max_tokens (rounded to blocks), schedule commits
  variable  iLLaDA's growing canvas, schedule commits, stop at EOS / stop strings
  fast      variable + confidence-threshold commits (τ) + block prefix cache + head on masked positions
  fast_fixed  the fixed canvas with threshold commits and the dual cache (Fast-dLLM's LLaDA setting)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Optional

from .config import LLADA, ContextError, IlladaError
from .decode import Block, Generation, Options, cut_at_stop, decode, run, stop_checker, think_token_id

MODES = ("exact", "variable", "fast", "fast_fixed")


@dataclass
class Settings:
    mode: str = "variable"
    max_tokens: int = 1024
    block_length: int = 32
    steps_per_block: int = 32
    temperature: float = 0.0
    threshold: float = 0.9
    cache: Optional[str] = None  # None: the mode's default
    refresh_every: int = 0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    think_boost: bool = False
    fit_context: bool = False  # a default budget: cut to the positions left (an asked-for one is refused)

    def as_dict(self):
        return asdict(self)

    def with_budget(self, max_tokens: Optional[int], cap: Optional[int] = None) -> "Settings":
        """The budget rule, for the CLI and the server alike: a max_tokens the user asked for is kept exactly
        (and refused if it does not fit); with none, the default (at most `cap`) is cut to the room left."""
        if max_tokens is not None:
            return replace(self, max_tokens=max_tokens, fit_context=False)
        return replace(self, max_tokens=min(self.max_tokens, cap or self.max_tokens), fit_context=True)


def default_settings(model, tokenizer=None) -> Settings:
    """The spec's official settings: iLLaDA = variable length, block 32, 32 steps per block, max 1024
    (2048 with a chat template); LLaDA = fixed canvas 128 tokens, 128 steps, block 32."""
    if model.args.source_layout == LLADA:
        return Settings(mode="exact", max_tokens=128, block_length=32, steps_per_block=32, fit_context=True)
    instruct = tokenizer is not None and getattr(tokenizer, "chat_template", None)
    return Settings(mode="variable", max_tokens=2048 if instruct else 1024, fit_context=True)


def build_prompt(tokenizer, messages: list[dict], raw: bool = False) -> list[int]:
    """Chat-template the messages (system text merged into the first user turn, as iLLaDA's template
    rejects a system role); raw: the last message's text as is."""
    if raw or not getattr(tokenizer, "chat_template", None):
        return tokenizer.encode(messages[-1]["content"], add_special_tokens=False)
    msgs, system = [], None
    for m in messages:
        if m["role"] == "system":
            system = m["content"]
            continue
        if system and m["role"] == "user":
            m = {"role": "user", "content": f"{system}\n\n{m['content']}"}
            system = None
        msgs.append(m)
    text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def options_for(model, s: Settings, tokenizer=None, prompt_len: Optional[int] = None) -> tuple[Options, int, bool]:
    """(Options, gen_length, variable) for a mode. Given the prompt's length, a budget that does not fit the
    model's positions is cut to the room left with `s.fit_context` (a fixed canvas to whole blocks) and
    refused without it (ContextError)."""
    if s.mode not in MODES:
        raise IlladaError(f"mode {s.mode!r}: use one of {', '.join(MODES)}")
    if s.max_tokens < 1:
        raise IlladaError("max_tokens must be at least 1")
    a = model.args
    kw = dict(mask_id=a.mask_token_id, eos_id=a.eos_token_id, eot_id=a.eot_token_id, pad_id=a.pad_token_id,
              block_length=s.block_length, steps=s.steps_per_block, temperature=s.temperature, seed=s.seed,
              refresh_every=s.refresh_every)
    if s.mode in ("fast", "fast_fixed"):
        kw.update(rule="threshold", threshold=s.threshold, cache=s.cache or ("prefix" if s.mode == "fast" else "dual"))
    else:
        kw.update(cache=s.cache or "none")
    think = think_token_id(tokenizer) if s.think_boost else None
    if think is not None:
        kw.update(think_token=think, think_boost=(100.0, 3.0))
    variable = s.mode not in ("exact", "fast_fixed")
    gen = s.max_tokens if variable else math.ceil(s.max_tokens / s.block_length) * s.block_length
    limit = model.args.max_position_embeddings
    if prompt_len is not None and prompt_len + gen > limit:
        room = limit - prompt_len
        room -= 0 if variable else room % s.block_length
        if not s.fit_context:
            whole = "" if gen == s.max_tokens else f", {gen} in whole blocks"
            raise ContextError(f"prompt ({prompt_len} tokens) + max_tokens ({s.max_tokens}{whole}) exceeds the "
                               f"model's {limit} positions; shorten the prompt or lower max_tokens")
        if room < 1:
            raise ContextError(f"prompt ({prompt_len} tokens) leaves no room in the model's {limit} positions; "
                               "shorten it")
        gen = room
    return Options(**kw), gen, variable


def complete(model, tokenizer, prompt_ids: list[int], s: Settings,
             on_text: Optional[Callable[[str], None]] = None, on_event: Optional[Callable] = None,
             should_stop: Optional[Callable[[], bool]] = None, cache=None) -> Generation:
    """Run one prompt; on_text gets the text as it is produced, block by block (cut at stops).
    cache: a BlockCache kept across calls (chat) so a shared prompt prefix is not recomputed."""
    opts, gen, variable = options_for(model, s, tokenizer, len(prompt_ids))
    stop = [x for x in s.stop if x]
    stop_fn = stop_checker(tokenizer, stop) if variable else None
    emitted = [""]
    acc: list[int] = []

    def handle(ev):
        if on_event is not None:
            on_event(ev)
        if isinstance(ev, Block):
            acc.extend(ev.tokens[0] if ev.tokens else [])
            if on_text is not None:
                text = cut_at_stop(tokenizer.decode(acc), stop)
                if ev.finished[0] or not text.endswith("\ufffd"):
                    on_text(text[len(emitted[0]):])
                    emitted[0] = text
        if should_stop is not None and should_stop():
            raise _Cancelled

    try:
        g = run(decode(model, [prompt_ids], opts, gen, variable=variable, stop_fn=stop_fn, cache=cache), handle)
    except _Cancelled:
        return Generation([acc], ["cancelled"], None)
    g.texts = [cut_at_stop(tokenizer.decode(t), stop) for t in g.tokens]
    if on_text is not None and len(g.texts[0]) > len(emitted[0]):
        on_text(g.texts[0][len(emitted[0]):])
    return g


class _Cancelled(Exception):
    pass
