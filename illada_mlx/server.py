"""`illada-mlx serve`: an OpenAI-compatible HTTP API (Starlette + uvicorn).

One worker thread owns the model and serves queued requests one model call at a time. Streaming
responses are server-sent events, one chunk per committed block. A client that disconnects cancels
its generation at the next block. Bad requests get OpenAI-shaped 4xx errors; the server keeps going.
Diffusion options go in a `diffusion` object (the openai client's `extra_body={"diffusion": {...}}`):
mode, block_length, steps_per_block, threshold, cache.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .cache import CACHES, REFRESHES
from .config import ContextError, IlladaError
from .engine import build_prompt, stream_generate
from .spec import PRESETS, DecodeSpec, make_spec

MAX_BODY_BYTES = 1 << 20
COMMON = {"model", "max_tokens", "max_completion_tokens", "temperature", "stop", "seed", "stream", "n", "user",
          "stream_options", "top_p", "diffusion"}
CHAT_FIELDS = COMMON | {"messages"}
COMPLETION_FIELDS = COMMON | {"prompt"}
DIFFUSION_FIELDS = {"mode", "block_length", "steps_per_block", "threshold", "cache", "refresh_every", "block_refresh",
                    "think_boost"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self):
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


@dataclass
class Job:
    prompt_ids: list
    spec: DecodeSpec  # resolved and validated when the request came in
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    cancel: threading.Event = field(default_factory=threading.Event)


class Engine:
    """The model, its tokenizer and the worker thread that serves the queue."""

    def __init__(self, model, tokenizer, name: str, max_queue: int = 16):
        self.model, self.tok, self.name = model, tokenizer, name
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.served = 0
        threading.Thread(target=self._work, daemon=True).start()

    def submit(self, job: Job):
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise ApiError(429, "the server is busy (request queue full); retry shortly", code="queue_full",
                           kind="rate_limit_error")

    def _work(self):
        while True:
            job = self.jobs.get()
            if job.cancel.is_set():
                continue
            emit = lambda kind, payload: job.loop.call_soon_threadsafe(job.out.put_nowait, (kind, payload))  # noqa
            try:
                for r in stream_generate(self.model, self.tok, job.prompt_ids, spec=job.spec):
                    if r.text:
                        emit("text", r.text)
                    if job.cancel.is_set():
                        break
                    if r.finish_reason is not None:
                        emit("done", r)
            except Exception as e:  # never let one request kill the worker
                emit("error", str(e).splitlines()[0] if str(e) else type(e).__name__)
            self.served += 1


# ------------------------------------------------------------------------------------------ requests
async def _body(request: Request, allowed: set) -> dict:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes", code="request_too_large")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the body is not valid JSON", code="invalid_json")
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}", param=unknown[0], code="unknown_field")
    return body


def _num(body, name, kind, lo, hi, default=None):
    v = body.get(name, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int) or not lo <= v <= hi:
        raise ApiError(400, f"{name} must be a{'n integer' if kind is int else ' number'} in [{lo}, {hi}]", param=name)
    return kind(v)


def _settings(engine: Engine, body: dict) -> dict:
    """The request's decode settings (make_spec keywords); unset ones keep the model's defaults."""
    limit = engine.model.args.max_position_embeddings
    mt = _num(body, "max_tokens", int, 1, limit) or _num(body, "max_completion_tokens", int, 1, limit)
    s = dict(max_tokens=mt, default_cap=512,  # none asked for: up to 512, cut to fit
             temperature=_num(body, "temperature", float, 0.0, 2.0), seed=_num(body, "seed", int, 0, 2**31 - 1))
    _num(body, "n", int, 1, 1)  # one choice per request
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(x, str) for x in stop):
            raise ApiError(400, "stop must be a string or a list of up to 4 strings", param="stop")
        s["stop"] = tuple(stop)
    d = body.get("diffusion") or {}
    if not isinstance(d, dict):
        raise ApiError(400, "diffusion must be an object", param="diffusion")
    bad = sorted(set(d) - DIFFUSION_FIELDS)
    if bad:
        raise ApiError(400, f"unknown diffusion option {bad[0]!r}", param=f"diffusion.{bad[0]}", code="unknown_field")
    for name, allowed in (("mode", PRESETS), ("cache", CACHES), ("block_refresh", REFRESHES)):
        if name in d:
            if d[name] not in allowed:
                raise ApiError(400, f"diffusion.{name} must be one of {', '.join(allowed)}", param=f"diffusion.{name}")
            s[name] = d[name]
    s["block_length"] = _num(d, "block_length", int, 1, 1024)
    s["steps_per_block"] = _num(d, "steps_per_block", int, 1, 1024)
    s["threshold"] = _num(d, "threshold", float, 1e-6, 1.0)
    s["refresh_every"] = _num(d, "refresh_every", int, 0, 1024)
    s["think_boost"] = bool(d.get("think_boost", False))
    return s


def _prompt(engine: Engine, body: dict, chat: bool) -> list:
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
                for m in msgs):
            raise ApiError(400, "messages must be a non-empty list of {role, content} with string content",
                           param="messages")
        ids = build_prompt(engine.tok, msgs)
    else:
        p = body.get("prompt")
        if not isinstance(p, str) or not p:
            raise ApiError(400, "prompt must be a non-empty string", param="prompt")
        ids = engine.tok.encode(p, add_special_tokens=False)
    return ids


async def _serve(request: Request, chat: bool):
    engine: Engine = request.app.state.engine
    try:
        body = await _body(request, CHAT_FIELDS if chat else COMPLETION_FIELDS)
        settings = _settings(engine, body)
        ids = _prompt(engine, body, chat)
        spec = make_spec(engine.model, engine.tok, len(ids), **settings)
    except ApiError as e:
        return e.response()
    except ContextError as e:
        return ApiError(400, str(e), param="messages" if chat else "prompt", code="context_length_exceeded").response()
    except IlladaError as e:
        return ApiError(400, str(e)).response()
    job = Job(ids, spec, asyncio.get_running_loop(), asyncio.Queue())
    try:
        engine.submit(job)
    except ApiError as e:
        return e.response()
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created, model_name = int(time.time()), engine.name
    obj = "chat.completion" if chat else "text_completion"

    def chunk(text, finish=None):
        if chat:
            choice = {"index": 0, "delta": ({"role": "assistant", "content": text} if text is not None else {}),
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish}
        return {"id": rid, "object": obj + ".chunk" if chat else obj, "created": created, "model": model_name,
                "choices": [choice]}

    if body.get("stream"):
        async def events():
            try:
                while True:
                    kind, payload = await job.out.get()
                    if kind == "text":
                        yield f"data: {json.dumps(chunk(payload))}\n\n"
                    elif kind == "error":
                        yield f"data: {json.dumps({'error': {'message': payload, 'type': 'server_error'}})}\n\n"
                        break
                    else:
                        yield f"data: {json.dumps(chunk(None, _finish(payload)))}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancel.set()  # a disconnect lands here too: the worker stops at the next block

        return StreamingResponse(events(), media_type="text/event-stream")

    parts = []
    while True:
        try:
            kind, payload = await asyncio.wait_for(job.out.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel.set()
                return JSONResponse({}, status_code=499)
            continue
        if kind == "text":
            parts.append(payload)
        if kind == "done":
            break
        if kind == "error":
            return ApiError(500, payload, kind="server_error").response()
    r = payload
    text = "".join(parts)
    usage = {"prompt_tokens": len(ids), "completion_tokens": r.generation_tokens,
             "total_tokens": len(ids) + r.generation_tokens}
    choice = {"index": 0, "finish_reason": _finish(r)}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return JSONResponse({"id": rid, "object": obj, "created": created, "model": model_name, "choices": [choice],
                         "usage": usage, "diffusion_stats": r.stats.as_dict(), "diffusion_settings": r.spec.as_dict()})


def _finish(r) -> str:
    return "stop" if r.finish_reason == "stop" else "length"


async def chat_completions(request):
    return await _serve(request, chat=True)


async def completions(request):
    return await _serve(request, chat=False)


async def models(request):
    e: Engine = request.app.state.engine
    return JSONResponse({"object": "list", "data": [{"id": e.name, "object": "model", "created": 0,
                                                      "owned_by": "illada-mlx"}]})


async def not_found(request, exc):
    return ApiError(404, f"no route {request.url.path}", code="not_found").response()


async def method_not_allowed(request, exc):
    return ApiError(405, f"method {request.method} not allowed on {request.url.path}").response()


async def server_error(request, exc):
    return ApiError(500, "internal error", kind="server_error").response()


def make_app(engine: Engine) -> Starlette:
    app = Starlette(routes=[
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ], exception_handlers={404: not_found, 405: method_not_allowed, 500: server_error})
    app.state.engine = engine
    return app
