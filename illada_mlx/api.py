"""The OpenAI request, read and checked: the body with limits (size while it streams in, JSON depth,
number length, valid strings), then field by field. Every refusal is an `ApiError`: one line, the field it
names, an OpenAI-shaped 4xx.

Fields with a meaning here are read into make_spec keywords (`settings`), choices, streaming and the
prompt; fields with no meaning for this model (`NEUTRAL`) are accepted at their neutral value and refused
otherwise; any other field is refused.
"""

from __future__ import annotations

import asyncio
import json
from typing import Optional

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from .config import IlladaError
from .settings import request_settings, setting
from .tools import MAX_CALLS, MODES, NAME, Tool, UnsupportedSchema, parse_tools, plain_messages

MAX_BODY_BYTES = 1 << 20
MAX_DEPTH = 32  # JSON nesting
MAX_NUMBER_CHARS = 40  # digits of one JSON number
MAX_TOP_LOGPROBS = 20

# fields with a meaning here; the request's own are added per endpoint
COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "n",
    "logprobs",
    "diffusion",
    "response_format",
}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice"}
COMPLETION_FIELDS = COMMON | {"prompt"}


def _number_is(x):
    return lambda v: not isinstance(v, bool) and isinstance(v, (int, float)) and v == x


# fields with no meaning for this model (or this endpoint: tools on /v1/completions): accepted at their neutral
# value (or null), refused otherwise
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
    "modalities": (lambda v: v == ["text"], '["text"]'),
    "user": (lambda v: isinstance(v, str), "a string"),
    "metadata": (lambda v: isinstance(v, dict), "an object"),
    "store": (lambda v: v is False, "false"),
    "service_tier": (lambda v: isinstance(v, str), "a string"),
    "echo": (lambda v: v is False, "false"),
    "best_of": (_number_is(1), "1"),
    "suffix": (lambda v: v == "", '""'),
}
DIFFUSION_FIELDS = {x.name for x in request_settings("diffusion")} | {"think_boost", "steps"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MESSAGE_FIELDS = {"role", "content", "name"}  # and per role:
ROLE_FIELDS = {"assistant": {"tool_calls"}, "tool": {"tool_call_id"}}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: Optional[str] = None,
        code: Optional[str] = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self):
        """The OpenAI-shaped error; a body refused unread (413, 408) closes the connection."""
        close = {"connection": "close"} if self.status in (408, 413) else None
        return JSONResponse(
            {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}},
            status_code=self.status,
            headers=close,
        )


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
                raise ApiError(
                    400,
                    f"{where or 'a key'} holds an invalid character (a lone surrogate)",
                    param=where or None,
                    code="invalid_string",
                )
        elif isinstance(v, dict):
            for k, x in v.items():
                stack.append((k, depth, where))
                stack.append((x, depth + 1, f"{where}.{k}" if where else k))
        elif isinstance(v, list):
            stack.extend((x, depth + 1, f"{where}[{i}]") for i, x in enumerate(v))


async def read_body(request: Request, max_body: int, seconds: float) -> bytes:
    """The body, refused with 413 as soon as it passes the limit (Content-Length first, then as it streams
    in) and with 408 when it takes longer than seconds."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > max_body:
        raise ApiError(413, f"request body over {max_body} bytes", code="request_too_large")

    async def collect() -> bytes:
        parts, got = [], 0
        async for chunk in request.stream():
            got += len(chunk)
            if got > max_body:
                raise ApiError(413, f"request body over {max_body} bytes", code="request_too_large")
            parts.append(chunk)
        return b"".join(parts)

    try:
        return await asyncio.wait_for(collect(), seconds)
    except ClientDisconnect:
        raise ApiError(400, "the client went away before its body arrived", code="client_disconnected")
    except asyncio.TimeoutError:
        raise ApiError(408, f"the body took longer than {seconds:g} s to arrive", code="timeout")


def check_fields(body: dict, allowed: set) -> None:
    for name in sorted(body):
        if name in allowed:
            continue
        if name not in NEUTRAL:
            raise ApiError(400, f"unknown field {name!r}", param=name, code="unknown_field")
        ok, neutral = NEUTRAL[name]
        if body[name] is not None and not ok(body[name]):
            raise ApiError(
                400,
                f"{name} is not supported by this model's server; send {neutral} or leave it out",
                param=name,
                code="unsupported_parameter",
            )


def _num(body, name, kind, lo, hi, default=None, where=""):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int) or not lo <= v <= hi:
        raise ApiError(
            400,
            f"{where}{name} must be a{'n integer' if kind is int else ' number'} in [{lo}, {hi}]",
            param=where + name,
        )
    return kind(v)


def _bool(body, name, where=""):
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise ApiError(400, f"{where}{name} must be true or false", param=where + name)
    return bool(v)


def _setting(d: dict, name: str, where: str = "", key: Optional[str] = None):
    """A registry setting (settings.py) read from a request object (at `key`, default its name), None when
    absent; a 400 naming the field when refused."""
    key = key or name
    v = d.get(key)
    if v is None:
        return None
    try:
        return setting(name).check(v, label=where + key)
    except IlladaError as e:
        raise ApiError(400, str(e), param=where + key)


def settings(a, body: dict) -> dict:
    """The request's decode settings (make_spec keywords) for a model of ModelArgs `a`; unset ones keep the
    model's defaults. Each one's type and range are the registry's (settings.py); the budget is also bounded
    by the model's positions."""
    limit = a.max_position_embeddings
    s = {x.name: _setting(body, x.name) for x in request_settings("body")}
    if s["max_tokens"] is None:
        s["max_tokens"] = _setting(body, "max_tokens", key="max_completion_tokens")
    if s["max_tokens"] is not None and s["max_tokens"] > limit:
        raise ApiError(400, f"max_tokens must be at most the model's {limit} positions", param="max_tokens")
    s["default_cap"] = 512  # none asked for: up to 512, cut to fit
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
    s.update({x.name: _setting(d, x.name, "diffusion.") for x in request_settings("diffusion")})
    s["think_boost"] = _bool(d, "think_boost", where="diffusion.")
    return s


# response_format {"type": "json_object"} without a schema: an object whose one value is the reply's text
JSON_OBJECT_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "maxLength": 256}},
    "required": ["answer"],
}


def response_schema(body: dict) -> Optional[dict]:
    """The JSON schema a request's response_format asks its answer to keep to (structured.py), or None for
    text; a 400 naming what is wrong or not supported."""
    rf = body.get("response_format")
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT_SCHEMA
    if kind != "json_schema":
        raise ApiError(400, "response_format.type must be text, json_object or json_schema", param="response_format")
    spec = rf.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise ApiError(
            400,
            "response_format.json_schema.schema must be a JSON schema object",
            param="response_format.json_schema.schema",
        )
    from .structured import compile_schema

    try:
        compile_schema(schema)
    except IlladaError as e:
        raise ApiError(400, str(e), param="response_format.json_schema.schema", code="unsupported_schema")
    return schema


def step_events(body: dict, stream: bool) -> bool:
    """diffusion.steps: whether a stream carries the denoising steps (server.py's step chunks); it needs
    stream: true. Read after settings(), which checked that diffusion is an object."""
    steps = _bool(body.get("diffusion") or {}, "steps", where="diffusion.")
    if steps and not stream:
        raise ApiError(
            400, "diffusion.steps needs stream: true (the steps are sent as stream chunks)", param="diffusion.steps"
        )
    return steps


def choices(body: dict, chat: bool, max_batch: int) -> tuple[int, int]:
    """(n, top log-probabilities: -1 for none)."""
    n = _num(body, "n", int, 1, max_batch, default=1)
    if chat:
        want = _bool(body, "logprobs")
        top = _num(body, "top_logprobs", int, 0, MAX_TOP_LOGPROBS, default=0)
        if top and not want:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return n, (top if want else -1)
    top = _num(body, "logprobs", int, 0, 5)
    return n, (-1 if top is None else top)


def streaming(body: dict) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    so = body.get("stream_options")
    so = {} if so is None else so
    if not isinstance(so, dict) or set(so) - {"include_usage", "include_obfuscation"}:
        raise ApiError(400, "stream_options must be an object with include_usage", param="stream_options")
    return stream, _bool(so, "include_usage", where="stream_options.")


def messages(body: dict, tools: Optional[list[Tool]] = None) -> list[dict]:
    """The conversation as plain {role, content} turns with text content (tools.plain_messages): developer
    turns are system turns, content parts are joined, an assistant's tool_calls are written as call texts,
    a tool turn is a user turn, and `tools` are offered in a system turn."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", param="messages")
    out = [_message(m, f"messages[{i}]") for i, m in enumerate(msgs)]
    if not any(m["role"] == "user" for m in out):
        raise ApiError(
            400, "messages has no user turn: a conversation needs at least one user message", param="messages"
        )
    return plain_messages(out, tools)


def _message(m, where: str) -> dict:
    """One message checked: {role, content} (an assistant's content may be null when it has tool_calls),
    and the assistant's tool_calls with arguments that parse as JSON."""
    if not isinstance(m, dict):
        raise ApiError(400, f"{where} must be an object with role and content", param=where)
    if not isinstance(m.get("role"), str) or m["role"] not in ROLES:  # a list or object is not hashable
        raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}", param=f"{where}.role")
    allowed = MESSAGE_FIELDS | ROLE_FIELDS.get(m["role"], set())
    extra = sorted(k for k in set(m) - allowed if m[k] not in (None, []))
    if extra:
        raise ApiError(400, f"{where}.{extra[0]} is not supported", param=f"{where}.{extra[0]}")
    calls = _tool_calls(m.get("tool_calls"), f"{where}.tool_calls") if m["role"] == "assistant" else []
    content = m.get("content")
    text = "" if content is None and calls else _content(content, f"{where}.content")
    return {"role": ROLES[m["role"]], "content": text, "tool_calls": calls}


def _tool_calls(calls, where: str) -> list[dict]:
    """An assistant turn's tool_calls as [{"name", "arguments"}], each checked: a function call whose
    name is a tool name and whose arguments are JSON text (or an object)."""
    if calls is None:
        return []
    if not isinstance(calls, list) or len(calls) > MAX_CALLS:
        raise ApiError(400, f"{where} must be a list of at most {MAX_CALLS} calls", param=where)
    out = []
    for j, c in enumerate(calls):
        at = f"{where}[{j}].function"
        fn = c.get("function") if isinstance(c, dict) and c.get("type", "function") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not NAME.match(name):
            raise ApiError(
                400, f"{at}.name must be a tool's name: 1-64 letters, digits, '_' or '-'", param=f"{at}.name"
            )
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                raise ApiError(400, f"{at}.arguments is not JSON", param=f"{at}.arguments")
        elif not isinstance(args, dict):
            raise ApiError(400, f"{at}.arguments must be JSON text", param=f"{at}.arguments")
        out.append({"name": name, "arguments": args})
    return out


def tool_request(body: dict) -> tuple[Optional[list[Tool]], str, list[Tool]]:
    """(the tools a chat request offers (shown to the model) or None, its tool_choice: auto (when tools are
    given and it says none), required or none, the tools it may call: all, or the one tool_choice names,
    with "required"); a 400 naming tools or tool_choice."""
    raw, choice = body.get("tools"), body.get("tool_choice")
    tools = None
    if raw is not None and raw != []:
        try:
            tools = parse_tools(raw)
        except UnsupportedSchema as e:
            raise ApiError(400, str(e), param="tools", code="unsupported_schema")
        except IlladaError as e:
            raise ApiError(400, str(e), param="tools")
    if choice is None:
        return tools, "auto" if tools else "none", tools or []
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        choice = fn.get("name") if isinstance(fn, dict) and isinstance(fn.get("name"), str) else None
        if choice is None:
            raise ApiError(
                400,
                'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
                param="tool_choice",
            )
        named = [t for t in tools or [] if t.name == choice]
        if not named:
            raise ApiError(400, f"tool_choice names {choice[:64]!r}, which tools does not offer", param="tool_choice")
        return tools, "required", named  # even a tool named "none" or "auto"
    if not isinstance(choice, str) or choice not in MODES:
        raise ApiError(400, 'tool_choice must be "none", "auto", "required" or a function', param="tool_choice")
    if choice == "required" and not tools:
        raise ApiError(400, "tool_choice required needs tools", param="tool_choice")
    return tools, choice, tools or []


def _content(c, where: str) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        texts = []
        for j, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(
                    400, f'{where}[{j}] must be a text part {{"type": "text", "text": ...}}', param=f"{where}[{j}]"
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise ApiError(400, f"{where} must be a string or a list of text parts", param=where)


def prompt_text(body: dict) -> str:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1:
        p = p[0]
    if not isinstance(p, str) or not p:
        raise ApiError(400, "prompt must be a non-empty string", param="prompt")
    return p
