"""OpenAI's wire shapes: a request's events (events.py) as one chat.completion / text_completion object
or as server-sent chunks, and log-probabilities as OpenAI's content entries (chat) or the legacy lists
(completions)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..api import ApiError
from .events import Failed, Finished, Job, Stepped, Text, unknown

log = logging.getLogger("illada_mlx.server")


def logprob_entries(tok, toks: list, lp, k: int) -> Optional[list]:
    """OpenAI's logprobs content entries for a block's tokens (lp: their BlockLogprobs; k: alternatives)."""
    if lp is None or k < 0:
        return None

    def entry(t, v):
        s = tok.decode([t])
        return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8", "replace"))}

    out = []
    for j, t in enumerate(toks):
        e = entry(t, lp.token[j])
        e["top_logprobs"] = [entry(a, v) for a, v in zip(lp.top_ids[j], lp.top[j])][:k] if k else []
        out.append(e)
    return out


def tool_call(call, index: Optional[int] = None) -> dict:
    """A tools.ToolCall as OpenAI's tool_calls entry (with its `index` in a stream's delta)."""
    out = {"id": "call_" + uuid.uuid4().hex[:24], "type": "function"}
    out["function"] = {"name": call.name, "arguments": call.arguments_json()}
    return out if index is None else {"index": index, **out}


class Answer:
    """A request's response in OpenAI's shapes: one JSON object, or server-sent chunks."""

    def __init__(self, chat: bool, model: str, prompt_tokens: int, include_usage: bool):
        self.chat, self.model, self.P, self.include_usage = chat, model, prompt_tokens, include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.offsets: dict[int, int] = {}  # choice -> characters of its tokens so far (text_offset)

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self, tokens: int) -> dict:
        return {"prompt_tokens": self.P, "completion_tokens": tokens, "total_tokens": self.P + tokens}

    def logprobs(self, entries: Optional[list], i: int = 0) -> Optional[dict]:
        """Chat: {"content": entries}. Completions: the legacy lists; text_offset is each token's character
        offset in choice i's text, counted on across a stream's chunks."""
        if entries is None:
            return None
        if self.chat:
            return {"content": entries}
        offsets, at = [], self.offsets.get(i, 0)
        for e in entries:
            offsets.append(at)
            at += len(e["token"])
        self.offsets[i] = at
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets,
        }

    def chunk(self, i: int, text=None, lp=None, finish=None, first=False, extra=None, call=None) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
            delta = {"tool_calls": [tool_call(call, 0)]} if call is not None else delta
            choice = {"index": i, "delta": delta, "logprobs": self.logprobs(lp, i), "finish_reason": finish}
        else:
            choice = {"index": i, "text": text or "", "logprobs": self.logprobs(lp, i), "finish_reason": finish}
        c = {**self.head(self.object + ".chunk" if self.chat else self.object), "choices": [choice]}
        if self.include_usage:
            c["usage"] = None
        if extra:
            c.update(extra)
        return f"data: {json.dumps(c)}\n\n"

    def finish_chunk(self, ev: Finished, steps: bool) -> str:
        extra = {"diffusion_stats": ev.stats, "diffusion_settings": ev.spec} if steps else None
        return self.chunk(ev.index, finish=ev.reason, extra=extra)

    async def events(self, job: Job, request: Request):
        """The stream: the role (chat), text chunks as blocks commit (a tool call: one chunk with
        delta.tool_calls), each choice's finish, the usage if
        asked for, [DONE]. With diffusion.steps, a chunk per denoising step before its block's text (an
        empty delta and a `diffusion` field) and the finish chunk carries diffusion_stats and
        diffusion_settings. Leaving early (a disconnect) cancels the job."""
        tokens, done = 0, 0
        try:
            if self.chat:
                for i in range(job.n):
                    yield self.chunk(i, first=True)
            while done < job.n:
                ev = await job.out.get()
                if isinstance(ev, Text):
                    yield self.chunk(ev.index, ev.text, ev.logprobs)
                elif isinstance(ev, Stepped):
                    yield self.chunk(ev.index, extra={"diffusion": ev.as_dict()})
                elif isinstance(ev, Failed):
                    yield f"data: {json.dumps({'error': {'message': ev.message, 'type': 'server_error'}})}\n\n"
                    break
                elif isinstance(ev, Finished):
                    tokens += ev.tokens
                    done += 1
                    if ev.call is not None:  # the call whole in one chunk, then its finish
                        yield self.chunk(ev.index, call=ev.call)
                    yield self.finish_chunk(ev, job.steps)
                else:
                    raise unknown(ev)
            if self.include_usage:
                last = {
                    **self.head(self.object + ".chunk" if self.chat else self.object),
                    "choices": [],
                    "usage": self.usage(tokens),
                }
                yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"
            request.state.tokens = (self.P, tokens)
        finally:
            if done < job.n:
                job.stop()  # the worker drops its rows at the step it is on

    async def reply(self, job: Job, request: Request) -> Response:
        """The whole response once every choice is done; a client gone meanwhile cancels the job."""
        texts, lps, ends = [[] for _ in range(job.n)], [None] * job.n, [None] * job.n
        while sum(x is not None for x in ends) < job.n:
            try:
                ev = await asyncio.wait_for(job.out.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.stop()
                    log.info("client disconnected: %s cancelled", self.id)
                    return Response(status_code=499)
                continue
            if isinstance(ev, Text):
                texts[ev.index].append(ev.text)
                if ev.logprobs is not None:
                    lps[ev.index] = (lps[ev.index] or []) + ev.logprobs
            elif isinstance(ev, Finished):
                ends[ev.index] = ev
            elif isinstance(ev, Failed):
                job.stop()
                return ApiError(500, ev.message, kind="server_error").response()
            elif not isinstance(ev, Stepped):
                raise unknown(ev)
        request.state.tokens = (self.P, sum(e.tokens for e in ends))
        return JSONResponse(self.whole(job, texts, lps, ends))

    def whole(self, job: Job, texts: list, lps: list, ends: list) -> dict:
        """The non-streamed object: each choice's text, finish and log-probabilities; usage; the first
        choice's figures and settings."""
        out = []
        for i in range(job.n):
            c = {
                "index": i,
                "finish_reason": ends[i].reason,
                "logprobs": self.logprobs(lps[i] if job.top_logprobs >= 0 else None, i),
            }
            if self.chat and ends[i].call is not None:
                c["message"] = {"role": "assistant", "content": None, "tool_calls": [tool_call(ends[i].call)]}
            elif self.chat:
                c["message"] = {"role": "assistant", "content": "".join(texts[i])}
            else:
                c["text"] = "".join(texts[i])
            out.append(c)
        return {
            **self.head(self.object),
            "choices": out,
            "usage": self.usage(sum(e.tokens for e in ends)),
            "diffusion_stats": ends[0].stats,
            "diffusion_settings": ends[0].spec,
        }
