"""The HTTP face: reading a request into a Job (api.py checks it), the routes, the web chat page's files,
the app (listen.py's guard in front) and `serve`."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Optional

from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..api import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    ApiError,
    check_fields,
    choices,
    messages,
    parse_json,
    prompt_text,
    read_body,
    response_schema,
    settings,
    step_events,
    streaming,
    tool_request,
)
from ..config import ContextError, IlladaError
from ..listen import Guard, LoopErrors, Options, bind, exposure, make_server, raise_fd_limit
from ..settings import as_json as settings_registry
from ..settings import setting
from ..spec import PRESETS, make_spec
from ..structured import template_length
from ..tools import call_length
from .events import Job
from .openai_wire import Answer
from .scheduler import Scheduler

log = logging.getLogger("illada_mlx.server")


# ------------------------------------------------------------------------------------------ reading a request
async def _request(request: Request, chat: bool):
    """(job, body, stream, include_usage) for a request, or ApiError."""
    scheduler: Scheduler = request.app.state.scheduler
    opts: Options = request.app.state.opts
    body = parse_json(await read_body(request, opts.max_body, opts.body_seconds))
    check_fields(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise ApiError(400, "model must be a string", param="model")
    s = settings(scheduler.model.args, body)
    n, top = choices(body, chat, scheduler.max_batch)
    stream, include_usage = streaming(body)
    steps = step_events(body, stream)
    schema = response_schema(body)
    if schema is not None and (top >= 0 or scheduler.group is not None):
        raise ApiError(
            400,
            "response_format json is answered whole: not with logprobs or several ranks",
            param="response_format",
        )
    tools, tool_choice, callable_tools = tool_request(body) if chat else (None, "none", [])
    if tools is not None and tool_choice != "none":
        _check_tool_job(n, top, steps, schema, scheduler.group)
    prompt = messages(body, tools) if chat else prompt_text(body)
    chars = sum(len(m["content"]) for m in prompt) if chat else len(prompt)
    limit = opts.max_prompt_chars or 16 * scheduler.model.args.max_position_embeddings
    if chars > limit:
        raise ApiError(
            400,
            f"the prompt has {chars} characters, more than this server takes ({limit})",
            param="messages" if chat else "prompt",
            code="context_length_exceeded",
        )
    ids = await asyncio.get_running_loop().run_in_executor(scheduler.pool, scheduler.encode, chat, prompt)
    try:
        spec = make_spec(scheduler.model, scheduler.tok, len(ids), **s)
    except ContextError as e:
        raise ApiError(400, str(e), param="messages" if chat else "prompt", code="context_length_exceeded")
    except IlladaError as e:
        raise ApiError(400, str(e))
    bl = spec.block_length
    if s["max_tokens"] is None and spec.growing and spec.max_tokens > bl:  # whole blocks: it can batch
        spec = replace(spec, max_tokens=spec.max_tokens - spec.max_tokens % bl)
    job = Job(ids, spec, asyncio.get_running_loop(), asyncio.Queue(), n=n, top_logprobs=top, steps=steps, schema=schema)
    if tools is not None and tool_choice != "none":
        job.tools, job.tool_choice = callable_tools, tool_choice
    if job.tools or schema is not None:
        await asyncio.get_running_loop().run_in_executor(scheduler.pool, _check_template_room, scheduler, job)
    return job, stream, include_usage


def _check_template_room(scheduler: Scheduler, job: Job) -> None:
    """Every template the job may decode (its JSON schema's, or a call to each of its tools) fits the
    model's positions after its prompt, and one block (a context_length_exceeded 400 naming the parameter
    otherwise)."""
    a = scheduler.model.args
    room = min(setting("block_length").hi, a.max_position_embeddings - len(job.prompt_ids))
    if job.schema is not None:
        needs = [("the JSON schema's template", template_length(scheduler.tok, job.schema, a.mask_token_id))]
    else:
        needs = [(f"a call to {t.name}", call_length(scheduler.tok, t, a.mask_token_id)) for t in job.tools]
    for what, n in needs:
        if n > room:
            raise ApiError(
                400,
                f"{what} takes {n} positions, more than the {room} this prompt leaves (at most "
                f"{setting('block_length').hi})",
                param="response_format" if job.schema is not None else "tools",
                code="context_length_exceeded",
            )


def _check_tool_job(n: int, top: int, steps: bool, schema, group) -> None:
    """What a request that may call a tool cannot have: a 400 naming the parameter."""
    if schema is not None:
        raise ApiError(
            400, "response_format json cannot be combined with tools (a call is JSON already)", param="response_format"
        )
    if n > 1:
        raise ApiError(400, "n must be 1 with tools", param="n")
    if top >= 0 or steps or group is not None:
        raise ApiError(400, "a request with tools takes no logprobs, diffusion.steps or several ranks", param="tools")


# ------------------------------------------------------------------------------------------ answering
async def _serve(request: Request, chat: bool):
    scheduler: Scheduler = request.app.state.scheduler
    try:
        job, stream, include_usage = await _request(request, chat)
        scheduler.submit(job)
    except ApiError as e:
        return e.response()
    answer = Answer(chat, scheduler.name, len(job.prompt_ids), include_usage)
    if stream:
        return StreamingResponse(answer.events(job, request), media_type="text/event-stream")
    return await answer.reply(job, request)


async def chat_completions(request):
    return await _serve(request, chat=True)


async def completions(request):
    return await _serve(request, chat=False)


def _model_card(e: Scheduler) -> dict:
    return {"id": e.name, "object": "model", "created": e.created, "owned_by": "illada-mlx"}


async def models(request):
    return JSONResponse({"object": "list", "data": [_model_card(request.app.state.scheduler)]})


async def model(request):
    e: Scheduler = request.app.state.scheduler
    if request.path_params["name"] != e.name:
        return ApiError(
            404,
            f"no model {request.path_params['name']!r}; this server has {e.name!r}",
            param="model",
            code="model_not_found",
        ).response()
    return JSONResponse(_model_card(e))


async def defaults(request):
    """What a request without diffusion options gets, per mode (the web page's settings panel): the
    default mode and each mode's block length, steps per block, commit rule, threshold, budget
    (max_tokens, before it is cut to the room a prompt leaves), temperature, cache and block refresh; and the
    ids that end
    a reply (EOS, EoT), which the page draws apart on the canvas; and the registry of settings (settings.py:
    each one's type, range or choices, help and where a request carries it)."""
    e: Scheduler = request.app.state.scheduler
    shown = (
        "block_length",
        "steps_per_block",
        "rule",
        "threshold",
        "error_bound",
        "stable_threshold",
        "max_tokens",
        "temperature",
        "cache",
        "block_refresh",
        "drift_threshold",
    )
    modes = {}
    for name in PRESETS:
        spec = make_spec(e.model, e.tok, 0, mode=name, default_cap=512)
        modes[name] = {k: getattr(spec, k) for k in shown}
    spec = make_spec(e.model, e.tok, 0)
    ends = [t for t in (spec.eos_id, spec.eot_id) if t is not None]
    return JSONResponse(
        {"model": e.name, "mode": spec.mode, "modes": modes, "end_tokens": ends, "settings": settings_registry()}
    )


async def health(request):
    e: Scheduler = request.app.state.scheduler
    return JSONResponse({"status": "ok", "model": e.name, "queued": e.queue_length()})


# ------------------------------------------------------------------------------------------ the web chat page
WEB = Path(__file__).parents[1] / "web"
STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}  # all it serves
PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "cache-control": "no-cache",
}


async def page(request):
    return Response((WEB / "index.html").read_bytes(), media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


async def static(request):
    """One of the page's files, by name from the fixed list (no path is ever built from anything else)."""
    name = request.path_params["name"]
    if name not in STATIC:
        return ApiError(404, f"no route {request.url.path}", code="not_found").response()
    return Response((WEB / name).read_bytes(), media_type=STATIC[name], headers=PAGE_HEADERS)


async def favicon(request):
    """The page's icon (also what a browser asks for by itself), so that no page load logs a 404."""
    return Response(
        (WEB / "favicon.svg").read_bytes(),
        media_type="image/svg+xml",
        headers={**PAGE_HEADERS, "cache-control": "max-age=86400"},
    )


async def not_found(request, exc):
    return ApiError(404, f"no route {request.url.path}", code="not_found").response()


async def method_not_allowed(request, exc):
    return ApiError(405, f"method {request.method} not allowed on {request.url.path}").response()


async def server_error(request, exc):
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return ApiError(500, "internal error", kind="server_error").response()


def make_app(scheduler: Scheduler, opts: Optional[Options] = None):
    opts = opts or Options()

    @asynccontextmanager
    async def lifespan(app):
        asyncio.get_running_loop().set_exception_handler(LoopErrors())  # an fd-limit burst: one line
        yield
        await asyncio.to_thread(scheduler.close)  # several ranks: the others end when the server stops

    app = Starlette(
        lifespan=lifespan,
        routes=[
            Route("/", page, methods=["GET"]),
            Route("/static/{name}", static, methods=["GET"]),
            Route("/favicon.ico", favicon, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/v1/illada/defaults", defaults, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{name:path}", model, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
        ],
        exception_handlers={404: not_found, 405: method_not_allowed, 500: server_error},
    )
    app.state.scheduler, app.state.opts = scheduler, opts
    guarded = Guard(app, opts)
    if opts.allowed_origins:
        return CORSMiddleware(
            guarded,
            allow_origins=list(opts.allowed_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type"],
        )
    return guarded


def serve(
    scheduler: Scheduler,
    host: str,
    port: int,
    opts: Options,
    log_level: str = "info",
    max_connections: int = 256,
    idle_seconds: float = 10.0,
    echo=print,
) -> None:
    """Bind, say where, serve until interrupted."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s")
    log.setLevel(log_level.upper())
    raise_fd_limit(max_connections)
    sock = bind(host, port)
    for line in exposure(host, opts):
        echo(line)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{sock.getsockname()[1]}"
    ranks = f"; tensor parallel over {scheduler.group.size()} ranks: one request at a time" if scheduler.group else ""
    echo(f"serving {scheduler.name} on {url}/v1; web chat on {url}/{ranks}")
    server = make_server(
        make_app(scheduler, opts),
        host,
        port,
        log_level if log_level != "info" else "warning",
        max_connections,
        idle_seconds,
    )
    server.run(sockets=[sock])
