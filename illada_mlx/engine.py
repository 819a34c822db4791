"""The engine every command and Python caller uses, in mlx-lm's shape.

    for r in stream_generate(model, tokenizer, messages, mode="fast", max_tokens=256):
        print(r.text, end="", flush=True)         # new text, one response per committed block
    print(r.finish_reason, r.generation_tps)      # the last response: finish_reason, stats, spec

`stream_generate` resolves the settings into a `DecodeSpec` (spec.make_spec: the model's defaults, the
mode preset, the budget rule) unless it is handed one, runs the sampler (decode.py), and turns each
finished block into text with mlx-lm's streaming detokenizer (text.py). `generate_text` joins it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

from .cache import BlockCache
from .config import IlladaError
from .decode import BlockDone, Stats, Step, decode
from .spec import DecodeSpec, make_spec
from .text import ReplyText
from .tools import plain_messages

Prompt = Union[str, list]  # text (no template), a list of token ids, or a list of chat messages


@dataclass
class Response:
    """One committed block of the reply (the last one carries finish_reason, stats and spec)."""

    text: str  # new text since the previous response (may be empty)
    tokens: list[int]  # the block's new tokens, cut at EOS
    prompt_tokens: int
    prompt_tps: float  # positions / s of the first forward, which reads the prompt and the masks (0: unknown)
    generation_tokens: int  # so far
    generation_tps: float  # generated tokens / time since the start, first forward included
    peak_memory: float  # GB, like mlx-lm
    forwards: int
    tokens_per_forward: float
    blocks_done: int
    blocks: int  # the budget in blocks
    finish_reason: Optional[str] = None  # "stop" or "length" on the last response
    stats: Optional[Stats] = None
    spec: Optional[DecodeSpec] = None
    first_forward_s: float = 0.0  # time to the end of the first forward (set from the first block on)
    first_forward_positions: Optional[int] = None  # positions it ran (None: a reused cache ran fewer)


def build_prompt(tokenizer, messages: list[dict], raw: bool = False) -> list[int]:
    """Chat-template the messages (system text merged into the first user turn after it, as iLLaDA's
    template rejects a system role; with no user turn after it, it is the user turn); an OpenAI history's
    tool calls and tool turns as tools.plain_messages writes them; raw, or a tokenizer without a template:
    the last message's text as is."""
    if raw or not getattr(tokenizer, "chat_template", None):
        return tokenizer.encode(messages[-1]["content"], add_special_tokens=False)
    msgs, system = [], None
    for m in plain_messages(messages):
        if m["role"] == "system":
            system = m["content"]
            continue
        if system is not None and m["role"] == "user":
            m = {"role": "user", "content": f"{system}\n\n{m['content']}"} if system else m
            system = None
        msgs.append(m)
    if system:
        msgs.append({"role": "user", "content": system})
    text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids for a prompt: chat messages go through the chat template, text is encoded as is."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise IlladaError("a text prompt needs the tokenizer: pass tokenizer= or token ids")
        return tokenizer.encode(prompt, add_special_tokens=False)
    prompt = list(prompt)
    if prompt and isinstance(prompt[0], dict):
        if tokenizer is None:
            raise IlladaError("chat messages need the tokenizer: pass tokenizer= or token ids")
        return build_prompt(tokenizer, prompt)
    return [int(t) for t in prompt]


class _Tally:
    """What a stream has written so far, and the Response that says it."""

    def __init__(self, prompt_len: int, spec: DecodeSpec, reused: bool):
        self.prompt_len, self.spec, self.reused = prompt_len, spec, reused
        self.t0 = time.perf_counter()
        self.produced = 0
        self.first_positions: Optional[int] = None  # the first forward's positions: rows (CFG's copies too) × canvas

    def step(self, ev: Step) -> None:
        if self.first_positions is None:
            self.first_positions = ev.canvas.shape[0] * ev.canvas.shape[1] * (2 if self.spec.cfg_scale > 0 else 1)

    def response(self, text: str, tokens, st: Stats, blocks_done: int, **end) -> Response:
        wall = time.perf_counter() - self.t0
        positions = self.first_positions if not self.reused else None
        tps = positions / max(st.prompt_s, 1e-9) if positions and st.prompt_s else 0.0
        return Response(
            text,
            tokens,
            self.prompt_len,
            tps,
            self.produced,
            self.produced / max(wall, 1e-9),
            _peak_gb(),
            st.nfe,
            self.produced / max(st.nfe, 1),
            blocks_done,
            self.spec.n_blocks,
            **end,
            first_forward_s=st.prompt_s,
            first_forward_positions=positions,
        )


def _resolve(model, tokenizer, prompt: Prompt, spec: Optional[DecodeSpec], prompt_cache, settings: dict):
    """(prompt ids, the spec to run): stream_generate's arguments checked."""
    if prompt_cache is not None and not isinstance(prompt_cache, BlockCache):
        raise IlladaError(
            "prompt_cache= takes a BlockCache (kept across chat turns); the cache policy is the `cache` setting"
        )
    ids = prompt_ids(tokenizer, prompt)
    if spec is None:
        spec = make_spec(model, tokenizer, len(ids), **settings)
    elif settings:
        raise IlladaError("pass either spec= or settings, not both")
    return ids, spec


def stream_generate(
    model,
    tokenizer,
    prompt: Prompt,
    *,
    spec: Optional[DecodeSpec] = None,
    prompt_cache: Optional[BlockCache] = None,
    on_step: Optional[Callable[[Step], None]] = None,
    **settings,
) -> Iterator[Response]:
    """Yield one Response per committed block, the last with finish_reason, stats and the spec that ran.

    settings: mode, max_tokens, block_length, steps_per_block, temperature, threshold, cache, stop, seed,
    think_boost, ... (spec.make_spec; `cache` is the cache policy); or pass a resolved `spec`. prompt_cache:
    a BlockCache kept across calls (chat turns, mlx-lm's name) so what the previous call computed for a
    shared prefix is not recomputed. on_step: called with every denoising Step.
    Stopping the iteration early stops the decode.
    """
    ids, spec = _resolve(model, tokenizer, prompt, spec, prompt_cache, settings)
    reply = ReplyText(tokenizer, spec.stop) if tokenizer is not None else None
    stop_fn = (lambda row, toks: reply.add(toks)) if reply is not None else None
    tally = _Tally(len(ids), spec, reused=prompt_cache is not None and prompt_cache.reuse > 0)
    events = decode(model, [ids], spec, stop_fn=stop_fn, cache=prompt_cache)
    try:
        for ev in events:
            if isinstance(ev, Step):
                tally.step(ev)
                if on_step is not None:
                    on_step(ev)
            elif isinstance(ev, BlockDone):
                tally.produced += len(ev.tokens[0])
                yield tally.response(reply.take() if reply else "", ev.tokens[0], ev.stats, ev.index + 1)
            else:
                if reply is not None:
                    reply.finish()
                end = dict(finish_reason=ev.finish_reasons[0], stats=ev.stats, spec=spec)
                yield tally.response(reply.take() if reply else "", [], ev.stats, ev.stats.blocks, **end)
    finally:
        events.close()


def generate_text(model, tokenizer, prompt: Prompt, **kw) -> str:
    """The whole reply as text (stream_generate, joined)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kw))


def _peak_gb() -> float:
    import mlx.core as mx

    return mx.get_peak_memory() / 1e9
