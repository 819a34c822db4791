"""`illada-mlx serve`: an OpenAI-compatible HTTP API (Starlette + uvicorn).

Routes: POST /v1/chat/completions, POST /v1/completions (`stream: true`: server-sent events, one chunk
per committed block), GET /v1/models, /v1/models/{id}, /health.

One worker thread owns the model. Requests whose decode settings are compatible (batch.batch_key: the
same DecodeSpec apart from seed, stop strings and budget, on the growing canvas) share a batch: a request
joins the running batch at the next block boundary and its rows leave when they are done (`max_batch`
rows at most); any other request is decoded alone when the batch is empty. `n` choices are rows of one
batch. A client that disconnects cancels its rows at the next block; a request that runs past
`max_request_seconds` ends with finish_reason "time_limit".

Requests are read with limits (body size while it streams in, JSON depth, number length, valid strings)
and checked field by field: a bad one gets one 400 naming the field, never a 500. Fields that mean
nothing for this model (penalties, logit_bias, tools, a response_format other than text) are accepted at
their neutral value and refused otherwise. Diffusion options go in a `diffusion` object (the openai
client's `extra_body={"diffusion": {...}}`): mode, block_length, steps_per_block, threshold, cache,
refresh_every, block_refresh, think_boost.

`Guard` (ASGI middleware) checks the Host header, the API key and the content type before a route runs
and writes one log line per request; `make_server` sets uvicorn's connection cap and timeouts.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import queue
import socket
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Optional

import uvicorn
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from .batch import Batch, LogprobTracker, Row, batch_key
from .cache import CACHES, REFRESHES
from .config import ContextError, IlladaError
from .engine import build_prompt, stream_generate
from .spec import PRESETS, DecodeSpec, make_spec
from .text import ReplyText

log = logging.getLogger("illada_mlx.server")

MAX_BODY_BYTES = 1 << 20
MAX_DEPTH = 32  # JSON nesting
MAX_NUMBER_CHARS = 40  # digits of one JSON number
MAX_TOP_LOGPROBS = 20
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")

# fields with a meaning here; the request's own are added per endpoint
COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "seed", "stream",
          "stream_options", "n", "logprobs", "diffusion"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs"}
COMPLETION_FIELDS = COMMON | {"prompt"}


def _number_is(x):
    return lambda v: not isinstance(v, bool) and isinstance(v, (int, float)) and v == x


# fields with no meaning for this model: accepted at their neutral value (or null), refused otherwise
NEUTRAL = {
    "presence_penalty": (_number_is(0), "0"),
    "frequency_penalty": (_number_is(0), "0"),
    "repetition_penalty": (_number_is(1), "1"),
    "logit_bias": (lambda v: v == {}, "{}"),
    "tools": (lambda v: v == [], "[]"),
    "functions": (lambda v: v == [], "[]"),
    "tool_choice": (lambda v: v in ("none", "auto"), '"none" or "auto"'),
    "function_call": (lambda v: v in ("none", "auto"), '"none" or "auto"'),
    "parallel_tool_calls": (lambda v: isinstance(v, bool), "a boolean"),
    "response_format": (lambda v: v == {"type": "text"}, '{"type": "text"}'),
    "modalities": (lambda v: v == ["text"], '["text"]'),
    "user": (lambda v: isinstance(v, str), "a string"),
    "metadata": (lambda v: isinstance(v, dict), "an object"),
    "store": (lambda v: v is False, "false"),
    "service_tier": (lambda v: isinstance(v, str), "a string"),
    "echo": (lambda v: v is False, "false"),
    "best_of": (_number_is(1), "1"),
    "suffix": (lambda v: v == "", '""'),
}
DIFFUSION_FIELDS = {"mode", "block_length", "steps_per_block", "threshold", "cache", "refresh_every", "block_refresh",
                    "think_boost"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self):
        """The OpenAI-shaped error; a body refused unread (413, 408) closes the connection."""
        close = {"connection": "close"} if self.status in (408, 413) else None
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=close)


@dataclass
class Options:
    """The server's limits and exposure settings (cli `serve` options)."""
    max_body: int = MAX_BODY_BYTES
    max_prompt_chars: Optional[int] = None  # None: 16 characters per position of the model
    body_seconds: float = 30.0  # to read a request's body
    api_key: Optional[str] = None
    allowed_hosts: Optional[tuple] = None  # None: any Host header
    allowed_origins: tuple = ()  # CORS; empty: off


# ------------------------------------------------------------------------------------------ the worker
@dataclass
class Job:
    prompt_ids: list
    spec: DecodeSpec  # resolved and validated when the request came in
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue  # (kind, choice index, payload)
    n: int = 1
    top_logprobs: int = -1  # -1: no log-probabilities
    cancel: threading.Event = field(default_factory=threading.Event)
    deadline: float = float("inf")  # time.monotonic() after which it ends with "time_limit"

    def emit(self, kind, index, payload=None):
        self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, index, payload))


@dataclass(eq=False)
class Choice:
    """One row of a job: its text so far."""
    job: Job
    index: int
    reply: ReplyText
    tokens: int = 0


class Engine:
    """The model, its tokenizer, the worker thread that serves the queue and a small pool that tokenizes."""

    def __init__(self, model, tokenizer, name: str, max_queue: int = 16, max_batch: int = 8,
                 max_request_seconds: float = 600.0):
        self.model, self.tok, self.name = model, tokenizer, name
        self.max_batch, self.max_request_seconds = max_batch, max_request_seconds
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.waiting: deque = deque()
        self.served = 0
        self.batch_sizes: list[int] = []  # rows in each batched block (reports and tests)
        self.created = int(time.time())
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="illada-tokenize")
        threading.Thread(target=self._work, daemon=True, name="illada-worker").start()

    def submit(self, job: Job):
        job.deadline = time.monotonic() + self.max_request_seconds
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(429, "the server is busy (request queue full); retry shortly", code="queue_full",
                           kind="rate_limit_error")

    def encode(self, chat: bool, prompt) -> list[int]:
        if chat:
            return build_prompt(self.tok, prompt)
        return self.tok.encode(prompt, add_special_tokens=False)

    # the loop
    def _work(self):
        batch: Optional[Batch] = None
        while True:
            self._collect(wait=batch is None and not self.waiting)
            if batch is None:
                job = self.waiting.popleft() if self.waiting else None
                if job is None or job.cancel.is_set():
                    continue
                if batch_key(job.spec) is None:
                    self._alone(job)
                    continue
                batch = Batch(self.model, job.spec)
                self._admit(batch, job)
            key = batch_key(batch.spec)
            while self.waiting and (self.waiting[0].cancel.is_set() or (
                    batch_key(self.waiting[0].spec) == key and batch.size + self.waiting[0].n <= self.max_batch
                    and batch.fits(len(self.waiting[0].prompt_ids), self.waiting[0].spec.max_tokens))):
                job = self.waiting.popleft()
                if not job.cancel.is_set():
                    self._admit(batch, job)
            try:
                self._drop(batch)
                if batch.size:
                    self._block(batch)
            except Exception as e:  # our bug: the batch's requests get an error, the worker goes on
                log.exception("decode failed")
                for row in batch.rows + batch.joining:
                    row.handle.job.emit("error", row.handle.index, _one_line(e))
                batch = None
                continue
            if not batch.size:
                batch = None

    def _collect(self, wait: bool):
        if wait:
            self.waiting.append(self.jobs.get())
        while True:
            try:
                self.waiting.append(self.jobs.get_nowait())
            except queue.Empty:
                return

    def _admit(self, batch: Batch, job: Job):
        for i in range(job.n):
            batch.add(Row(Choice(job, i, ReplyText(self.tok, job.spec.stop)), job.prompt_ids, job.spec.max_tokens,
                          job.top_logprobs))

    def _drop(self, batch: Batch):
        """Rows of cancelled jobs leave; rows out of time end with "time_limit"."""
        now = time.monotonic()
        gone = {r.handle for r in batch.rows + batch.joining if r.handle.job.cancel.is_set() or now > r.handle.job.deadline}
        for row in batch.remove(gone):
            c = row.handle
            if not c.job.cancel.is_set():
                c.reply.finish()
                c.job.emit("text", c.index, (c.reply.take(), None))
                c.job.emit("done", c.index, self._info("time_limit", c.tokens, batch.row_stats(row, c.tokens), batch.spec))
            self._done(c)

    def _block(self, batch: Batch):
        ks = [r.top_logprobs for r in batch.rows + batch.joining]
        tracker = LogprobTracker(max(ks)) if max(ks) >= 0 else None
        self.batch_sizes.append(batch.size)
        for row, toks, reason, lp in batch.run_block(lambda r, t: r.handle.reply.add(t), tracker):
            c = row.handle
            c.tokens += len(toks)
            if reason is not None:
                c.reply.finish()
            text = c.reply.take()
            if text or toks:
                c.job.emit("text", c.index, (text, self._logprobs(toks, lp, row.top_logprobs)))
            if reason is not None:
                c.job.emit("done", c.index, self._info(reason, c.tokens, batch.row_stats(row, c.tokens), batch.spec))
                self._done(c)

    def _done(self, c: Choice):
        """Count a request served (finished or cancelled) with its last choice."""
        if c.index == c.job.n - 1:
            self.served += 1

    def _alone(self, job: Job):
        """A request that shares no batch: its choices one after another through the engine."""
        try:
            for i in range(job.n):
                spec = job.spec if job.spec.seed is None else replace(job.spec, seed=job.spec.seed + i)
                if not self._alone_choice(job, i, spec):
                    break
        except Exception as e:  # our bug: this request gets an error, the worker goes on
            log.exception("decode failed")
            job.emit("error", 0, _one_line(e))
        self.served += 1

    def _alone_choice(self, job: Job, i: int, spec: DecodeSpec) -> bool:
        P, bl, end = len(job.prompt_ids), spec.block_length, len(job.prompt_ids) + spec.max_tokens
        tracker = LogprobTracker(job.top_logprobs) if job.top_logprobs >= 0 else None

        def on_step(ev):
            if tracker is not None:
                if ev.step == 0:
                    lo = P + ev.block * bl
                    tracker.start(1, lo, min(bl, end - lo))
                tracker.step(ev)

        tokens, r = 0, None
        for r in stream_generate(self.model, self.tok, job.prompt_ids, spec=spec, on_step=on_step):
            tokens += len(r.tokens)
            lp = tracker.result() if tracker is not None and r.tokens else None
            if r.text or r.tokens:
                job.emit("text", i, (r.text, self._logprobs(r.tokens, _first_row(lp, len(r.tokens)),
                                                             job.top_logprobs)))
            if job.cancel.is_set():
                return False
            if r.finish_reason is None and time.monotonic() > job.deadline:
                job.emit("done", i, self._info("time_limit", tokens, None, spec))
                return False
        job.emit("done", i, self._info(r.finish_reason, tokens, r.stats, spec))
        return True

    @staticmethod
    def _info(reason, tokens, stats, spec) -> dict:
        return {"finish_reason": reason, "completion_tokens": tokens,
                "stats": stats.as_dict() if stats is not None else None, "spec": spec.as_dict()}

    def _logprobs(self, toks, lp, k) -> Optional[list]:
        """OpenAI's logprobs content entries for a block's tokens."""
        if lp is None or k < 0:
            return None

        def entry(t, v):
            s = self.tok.decode([t])
            return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8", "replace"))}

        out = []
        for j, t in enumerate(toks):
            e = entry(t, lp.token[j])
            e["top_logprobs"] = [entry(a, v) for a, v in zip(lp.top_ids[j], lp.top[j])][:k] if k else []
            out.append(e)
        return out


def _first_row(lp, n):
    from .batch import _row

    return _row(lp, 0, n)


def _one_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


# ------------------------------------------------------------------------------------------ reading a request
def _int(s: str):
    if len(s) > MAX_NUMBER_CHARS:
        raise ApiError(400, f"a number in the body has more than {MAX_NUMBER_CHARS} digits", code="invalid_json")
    return int(s)


def _float(s: str):
    if len(s) > MAX_NUMBER_CHARS:
        raise ApiError(400, f"a number in the body has more than {MAX_NUMBER_CHARS} characters", code="invalid_json")
    v = float(s)
    if v in (float("inf"), float("-inf")):
        raise ApiError(400, "a number in the body is out of range", code="invalid_json")
    return v


def _constant(s: str):
    raise ApiError(400, f"{s} is not valid JSON", code="invalid_json")


def parse_json(raw: bytes) -> dict:
    """The body as a JSON object, read with limits: UTF-8, depth, number length, valid strings."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not valid UTF-8", code="invalid_json")
    try:
        body = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except RecursionError:
        raise ApiError(400, f"the body nests deeper than {MAX_DEPTH} levels", code="invalid_json")
    except ValueError:
        raise ApiError(400, "the body is not valid JSON", code="invalid_json")
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    _check_values(body)
    return body


def _check_values(body: dict) -> None:
    """Depth at most MAX_DEPTH; every string (keys too) encodable as UTF-8 (no lone surrogates)."""
    stack = [(body, 1, "")]
    while stack:
        v, depth, where = stack.pop()
        if depth > MAX_DEPTH:
            raise ApiError(400, f"the body nests deeper than {MAX_DEPTH} levels", code="invalid_json")
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, f"{where or 'a key'} holds an invalid character (a lone surrogate)",
                               param=where or None, code="invalid_string")
        elif isinstance(v, dict):
            for k, x in v.items():
                stack.append((k, depth, where))
                stack.append((x, depth + 1, f"{where}.{k}" if where else k))
        elif isinstance(v, list):
            stack.extend((x, depth + 1, f"{where}[{i}]") for i, x in enumerate(v))


async def read_body(request: Request, opts: Options) -> bytes:
    """The body, refused with 413 as soon as it passes the limit (Content-Length first, then as it streams
    in) and with 408 when it takes longer than opts.body_seconds."""
    size = request.headers.get("content-length")
    if size is not None and (not size.isdigit() or int(size) > opts.max_body):
        raise ApiError(413, f"request body over {opts.max_body} bytes", code="request_too_large")
    parts, got = [], 0
    try:
        async with asyncio.timeout(opts.body_seconds):
            async for chunk in request.stream():
                got += len(chunk)
                if got > opts.max_body:
                    raise ApiError(413, f"request body over {opts.max_body} bytes", code="request_too_large")
                parts.append(chunk)
    except TimeoutError:
        raise ApiError(408, f"the body took longer than {opts.body_seconds:g} s to arrive", code="timeout")
    return b"".join(parts)


def _check_fields(body: dict, allowed: set) -> None:
    for name in sorted(body):
        if name in allowed:
            continue
        if name not in NEUTRAL:
            raise ApiError(400, f"unknown field {name!r}", param=name, code="unknown_field")
        ok, neutral = NEUTRAL[name]
        if body[name] is not None and not ok(body[name]):
            raise ApiError(400, f"{name} is not supported by this model's server; send {neutral} or leave it out",
                           param=name, code="unsupported_parameter")


def _num(body, name, kind, lo, hi, default=None, where=""):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int) or not lo <= v <= hi:
        raise ApiError(400, f"{where}{name} must be a{'n integer' if kind is int else ' number'} in [{lo}, {hi}]",
                       param=where + name)
    return kind(v)


def _bool(body, name, where=""):
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise ApiError(400, f"{where}{name} must be true or false", param=where + name)
    return bool(v)


def _settings(engine: Engine, body: dict) -> dict:
    """The request's decode settings (make_spec keywords); unset ones keep the model's defaults."""
    a = engine.model.args
    limit = a.max_position_embeddings
    mt = _num(body, "max_tokens", int, 1, limit)
    mt = mt if mt is not None else _num(body, "max_completion_tokens", int, 1, limit)
    s = dict(max_tokens=mt, default_cap=512,  # none asked for: up to 512, cut to fit
             temperature=_num(body, "temperature", float, 0.0, 2.0), seed=_num(body, "seed", int, 0, 2**31 - 1),
             top_p=_num(body, "top_p", float, 0.0, 1.0), top_k=_num(body, "top_k", int, 0, a.vocab_size),
             min_p=_num(body, "min_p", float, 0.0, 1.0))
    if s["top_p"] == 0.0:
        raise ApiError(400, "top_p must be a number in (0, 1]", param="top_p")
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(x, str) for x in stop):
            raise ApiError(400, "stop must be a string or a list of up to 4 strings", param="stop")
        s["stop"] = tuple(stop)
    d = body.get("diffusion")
    d = {} if d is None else d
    if not isinstance(d, dict):
        raise ApiError(400, "diffusion must be an object", param="diffusion")
    bad = sorted(set(d) - DIFFUSION_FIELDS)
    if bad:
        raise ApiError(400, f"unknown diffusion option {bad[0]!r}", param=f"diffusion.{bad[0]}", code="unknown_field")
    for name, allowed in (("mode", PRESETS), ("cache", CACHES), ("block_refresh", REFRESHES)):
        if d.get(name) is not None:
            if not isinstance(d[name], str) or d[name] not in allowed:
                raise ApiError(400, f"diffusion.{name} must be one of {', '.join(allowed)}", param=f"diffusion.{name}")
            s[name] = d[name]
    s["block_length"] = _num(d, "block_length", int, 1, 1024, where="diffusion.")
    s["steps_per_block"] = _num(d, "steps_per_block", int, 1, 1024, where="diffusion.")
    s["threshold"] = _num(d, "threshold", float, 1e-6, 1.0, where="diffusion.")
    s["refresh_every"] = _num(d, "refresh_every", int, 0, 1024, where="diffusion.")
    s["think_boost"] = _bool(d, "think_boost", where="diffusion.")
    return s


def _choices(body: dict, chat: bool, max_batch: int) -> tuple[int, int]:
    """(n, top log-probabilities: -1 for none)."""
    n = _num(body, "n", int, 1, max_batch, default=1)
    if chat:
        want = _bool(body, "logprobs")
        top = _num(body, "top_logprobs", int, 0, MAX_TOP_LOGPROBS, default=0)
        if body.get("top_logprobs") is not None and not want:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return n, (top if want else -1)
    top = _num(body, "logprobs", int, 0, 5)
    return n, (-1 if top is None else top)


def _stream(body: dict) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    so = body.get("stream_options")
    so = {} if so is None else so
    if not isinstance(so, dict) or set(so) - {"include_usage", "include_obfuscation"}:
        raise ApiError(400, "stream_options must be an object with include_usage", param="stream_options")
    return stream, _bool(so, "include_usage", where="stream_options.")


def _messages(body: dict) -> list[dict]:
    """The conversation as {role, content} with text content: developer turns are system turns, content
    parts are joined."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", param="messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object with role and content", param=where)
        extra = sorted(k for k in set(m) - {"role", "content", "name"} if m[k] not in (None, []))
        if extra:
            raise ApiError(400, f"{where}.{extra[0]} is not supported", param=f"{where}.{extra[0]}")
        if m.get("role") not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}", param=f"{where}.role")
        out.append({"role": ROLES[m["role"]], "content": _content(m.get("content"), f"{where}.content")})
    return out


def _content(c, where: str) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        texts = []
        for j, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"{where}[{j}] must be a text part {{\"type\": \"text\", \"text\": ...}}",
                               param=f"{where}[{j}]")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ApiError(400, f"{where} must be a string or a list of text parts", param=where)


def _prompt_text(body: dict) -> str:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1:
        p = p[0]
    if not isinstance(p, str) or not p:
        raise ApiError(400, "prompt must be a non-empty string", param="prompt")
    return p


async def _request(request: Request, chat: bool):
    """(job, body, stream, include_usage) for a request, or ApiError."""
    engine: Engine = request.app.state.engine
    opts: Options = request.app.state.opts
    body = parse_json(await read_body(request, opts))
    _check_fields(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise ApiError(400, "model must be a string", param="model")
    settings = _settings(engine, body)
    n, top = _choices(body, chat, engine.max_batch)
    stream, include_usage = _stream(body)
    prompt = _messages(body) if chat else _prompt_text(body)
    chars = sum(len(m["content"]) for m in prompt) if chat else len(prompt)
    limit = opts.max_prompt_chars or 16 * engine.model.args.max_position_embeddings
    if chars > limit:
        raise ApiError(400, f"the prompt has {chars} characters, more than this server takes ({limit})",
                       param="messages" if chat else "prompt", code="context_length_exceeded")
    ids = await asyncio.get_running_loop().run_in_executor(engine.pool, engine.encode, chat, prompt)
    try:
        spec = make_spec(engine.model, engine.tok, len(ids), **settings)
    except ContextError as e:
        raise ApiError(400, str(e), param="messages" if chat else "prompt", code="context_length_exceeded")
    except IlladaError as e:
        raise ApiError(400, str(e))
    bl = spec.block_length
    if settings["max_tokens"] is None and spec.growing and spec.max_tokens > bl:  # whole blocks: it can batch
        spec = replace(spec, max_tokens=spec.max_tokens - spec.max_tokens % bl)
    job = Job(ids, spec, asyncio.get_running_loop(), asyncio.Queue(), n=n, top_logprobs=top)
    return job, stream, include_usage


# ------------------------------------------------------------------------------------------ answering
async def _serve(request: Request, chat: bool):
    engine: Engine = request.app.state.engine
    try:
        job, stream, include_usage = await _request(request, chat)
        engine.submit(job)
    except ApiError as e:
        return e.response()
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created, model_name = int(time.time()), engine.name
    obj = "chat.completion" if chat else "text_completion"
    P = len(job.prompt_ids)

    def usage(tokens):
        return {"prompt_tokens": P, "completion_tokens": tokens, "total_tokens": P + tokens}

    def logprobs(entries):
        if entries is None:
            return None
        if chat:
            return {"content": entries}
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
                "text_offset": []}

    def chunk(i, text=None, lp=None, finish=None, first=False):
        if chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
            choice = {"index": i, "delta": delta, "logprobs": logprobs(lp), "finish_reason": finish}
        else:
            choice = {"index": i, "text": text or "", "logprobs": logprobs(lp), "finish_reason": finish}
        c = {"id": rid, "object": "chat.completion.chunk" if chat else obj, "created": created, "model": model_name,
             "choices": [choice]}
        if include_usage:
            c["usage"] = None
        return f"data: {json.dumps(c)}\n\n"

    if stream:
        async def events():
            tokens, done = 0, 0
            try:
                if chat:
                    for i in range(job.n):
                        yield chunk(i, first=True)
                while done < job.n:
                    kind, i, payload = await job.out.get()
                    if kind == "text":
                        yield chunk(i, payload[0], payload[1])
                    elif kind == "error":
                        yield f"data: {json.dumps({'error': {'message': payload, 'type': 'server_error'}})}\n\n"
                        break
                    else:
                        tokens += payload["completion_tokens"]
                        done += 1
                        yield chunk(i, finish=payload["finish_reason"])
                if include_usage:
                    yield f"data: {json.dumps({'id': rid, 'object': obj + '.chunk' if chat else obj, 'created': created, 'model': model_name, 'choices': [], 'usage': usage(tokens)})}\n\n"
                yield "data: [DONE]\n\n"
                request.state.tokens = (P, tokens)
            finally:
                if done < job.n:
                    job.cancel.set()  # a disconnect lands here too: the worker drops its rows at the next block

        return StreamingResponse(events(), media_type="text/event-stream")

    texts, lps = [[] for _ in range(job.n)], [None] * job.n
    infos = [None] * job.n
    while sum(i is not None for i in infos) < job.n:
        try:
            kind, i, payload = await asyncio.wait_for(job.out.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel.set()
                log.info("client disconnected: %s cancelled", rid)
                return Response(status_code=499)
            continue
        if kind == "text":
            texts[i].append(payload[0])
            if payload[1] is not None:
                lps[i] = (lps[i] or []) + payload[1]
        elif kind == "done":
            infos[i] = payload
        else:
            job.cancel.set()
            return ApiError(500, payload, kind="server_error").response()
    choices = []
    for i in range(job.n):
        c = {"index": i, "finish_reason": infos[i]["finish_reason"],
             "logprobs": logprobs(lps[i] if job.top_logprobs >= 0 else None)}
        if chat:
            c["message"] = {"role": "assistant", "content": "".join(texts[i])}
        else:
            c["text"] = "".join(texts[i])
        choices.append(c)
    tokens = sum(x["completion_tokens"] for x in infos)
    request.state.tokens = (P, tokens)
    return JSONResponse({"id": rid, "object": obj, "created": created, "model": model_name, "choices": choices,
                         "usage": usage(tokens), "diffusion_stats": infos[0]["stats"],
                         "diffusion_settings": infos[0]["spec"]})


async def chat_completions(request):
    return await _serve(request, chat=True)


async def completions(request):
    return await _serve(request, chat=False)


def _model_card(e: Engine) -> dict:
    return {"id": e.name, "object": "model", "created": e.created, "owned_by": "illada-mlx"}


async def models(request):
    return JSONResponse({"object": "list", "data": [_model_card(request.app.state.engine)]})


async def model(request):
    e: Engine = request.app.state.engine
    if request.path_params["name"] != e.name:
        return ApiError(404, f"no model {request.path_params['name']!r}; this server has {e.name!r}",
                        param="model", code="model_not_found").response()
    return JSONResponse(_model_card(e))


async def health(request):
    e: Engine = request.app.state.engine
    return JSONResponse({"status": "ok", "model": e.name, "queued": e.jobs.qsize() + len(e.waiting)})


async def not_found(request, exc):
    return ApiError(404, f"no route {request.url.path}", code="not_found").response()


async def method_not_allowed(request, exc):
    return ApiError(405, f"method {request.method} not allowed on {request.url.path}").response()


async def server_error(request, exc):
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return ApiError(500, "internal error", kind="server_error").response()


# ------------------------------------------------------------------------------------------ the guard
def _host_name(host: str) -> str:
    """The Host header without its port."""
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Guard:
    """Before any route: the Host header (DNS rebinding), the API key (Bearer), application/json on POST.
    After: one log line per request (method, path, status, prompt/output tokens, ms); a client that went
    away is one line too."""

    def __init__(self, app, opts: Options):
        self.app, self.opts = app, opts

    def _refuse(self, scope) -> Optional[ApiError]:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = _host_name(headers.get("host", "")).lower()
        if self.opts.allowed_hosts is not None and host not in self.opts.allowed_hosts:
            return ApiError(400, f"Host {host!r} is not served here; start the server with --allowed-hosts to "
                                 "allow it", code="invalid_host")
        key = self.opts.api_key
        if key and scope["path"] != "/health" and scope["method"] != "OPTIONS":
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>",
                                code="invalid_api_key", kind="authentication_error")
        if scope["method"] == "POST":
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return ApiError(415, "the body must be sent as Content-Type: application/json",
                                code="unsupported_media_type")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        refused = self._refuse(scope)
        try:
            if refused is not None:
                await refused.response()(scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        except (ClientDisconnect, OSError) as e:
            log.info("%s %s: client disconnected (%s)", scope["method"], scope["path"], type(e).__name__)
        tokens = scope.get("state", {}).get("tokens")
        log.info("%s %s %s%s %.0f ms", scope["method"], scope["path"], status[0] or "-",
                 f" prompt={tokens[0]} output={tokens[1]}" if tokens else "", 1000 * (time.perf_counter() - t0))


def make_app(engine: Engine, opts: Optional[Options] = None):
    opts = opts or Options()
    app = Starlette(routes=[
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ], exception_handlers={404: not_found, 405: method_not_allowed, 500: server_error})
    app.state.engine, app.state.opts = engine, opts
    guarded = Guard(app, opts)
    if opts.allowed_origins:
        return CORSMiddleware(guarded, allow_origins=list(opts.allowed_origins), allow_methods=["GET", "POST"],
                              allow_headers=["authorization", "content-type"])
    return guarded


# ------------------------------------------------------------------------------------------ uvicorn
class Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers (an idle or slow connection is
    closed) and a cap on open connections (over it, the oldest connection without a request in flight is
    closed to make room)."""
    header_seconds = 10.0
    max_connections = 256

    def connection_made(self, transport):
        super().connection_made(transport)
        self.opened = self.loop.time()
        self._waiting_for = None
        self._arm()
        open_ = [c for c in self.connections if not c.transport.is_closing()]
        if len(open_) > self.max_connections:
            idle = [c for c in open_ if getattr(c, "opened", None) is not None
                    and (c.cycle is None or c.cycle.response_complete)]
            oldest = min(idle, key=lambda c: c.opened, default=self)
            oldest.transport.close()

    def _arm(self):
        self._deadline = self.loop.call_later(self.header_seconds, self._too_slow)
        self._waiting_for = self.cycle

    def _too_slow(self):
        if self.cycle is self._waiting_for and not self.transport.is_closing():
            self.transport.close()  # no request headers in time

    def handle_events(self):
        super().handle_events()
        if self.cycle is not self._waiting_for and self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def on_response_complete(self):
        super().on_response_complete()
        if not self.transport.is_closing():
            if self._deadline is not None:
                self._deadline.cancel()
            self._arm()

    def connection_lost(self, exc):
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)


def make_server(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                max_connections: int = 256, idle_seconds: float = 10.0) -> uvicorn.Server:
    """A uvicorn server with the connection cap, keep-alive and header timeouts set."""
    proto = type("Protocol", (Protocol,), {"header_seconds": idle_seconds, "max_connections": max_connections})
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, http=proto, log_level=log_level, access_log=False,
                                         limit_concurrency=2 * max_connections, timeout_keep_alive=int(idle_seconds) or 1,
                                         timeout_graceful_shutdown=5))


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or one line saying why not."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(128)
    except OSError as e:
        raise IlladaError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or --host")
    return sock


def exposure(host: str, opts: Options) -> list[str]:
    """Fill in the Host names accepted for a bound host (loopback: the localhost names; a named address:
    itself; all interfaces: any, unless --allowed-hosts) and return the warnings to print."""
    loopback = host in LOOPBACK
    if opts.allowed_hosts is None and loopback:
        opts.allowed_hosts = tuple(sorted(set(LOOPBACK)))
    elif opts.allowed_hosts is None and host not in ("0.0.0.0", "::", ""):
        opts.allowed_hosts = (host.lower(),)
    if not loopback and not opts.api_key:
        return [f"warning: listening on {host}, beyond this machine, without an API key: anyone who can reach "
                "it can use it (set --api-key or ILLADA_MLX_API_KEY)"]
    return []


def serve(engine: Engine, host: str, port: int, opts: Options, log_level: str = "info",
          max_connections: int = 256, idle_seconds: float = 10.0, echo=print) -> None:
    """Bind, say where, serve until interrupted."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s")
    log.setLevel(log_level.upper())
    sock = bind(host, port)
    for line in exposure(host, opts):
        echo(line)
    shown = f"[{host}]" if ":" in host else host
    echo(f"serving {engine.name} on http://{shown}:{sock.getsockname()[1]}/v1")
    server = make_server(make_app(engine, opts), host, port, log_level if log_level != "info" else "warning",
                         max_connections, idle_seconds)
    server.run(sockets=[sock])
