"""Tool calling's text contract: how the tools a request offers are shown to the model, how a call is
written on the canvas, and how calls and results in a conversation's history are rendered. The runtime
(server, engine) and the demo model's training rows (training/tool_tasks.py) both use these functions,
so what the model is trained on and what it is shown are the same text.

- The tools are listed in a system turn, one signature a line (`tools_text`): `add(a: integer, b: integer)`,
  with the description after " - " when there is one. The engine merges a system turn into the next user
  turn (engine.build_prompt), so the model reads `tools:\\nadd(...)\\n\\n57+68=`.
- A call is the JSON object `{"name":"add","arguments":{"a":57,"b":68}}` (`call_text`, compact as the
  canvas template writes it); `call_schema` is its JSON schema, which structured.compile_schema turns into a
  canvas template whose `arguments` holes the model fills, so a call is valid by construction.
- In a conversation's history an assistant turn's calls are written as their call texts, one a line, and a
  `tool` turn is a user turn `tool: <result>` (chat templates without a tool role accept it):
  `plain_messages` turns an OpenAI conversation (tools, `tool_calls`, `tool` turns) into plain turns.

Answering with a call (`generate_tool_call`, the decision rule the demo model is trained for):
- `choice` "none": no call, a free-form answer. "auto": one forward over the prompt and `block_length`
  masks; a call iff the likeliest token at the first answer position is CALL_PREFIX's first token (`{`).
- Which tool ("auto" deciding to call, or "required", with several tools): one forward over the prompt,
  CALL_PREFIX's tokens and masks; each tool scores the summed log-probabilities of its name's tokens and
  then `"`'s right after the prefix; the best one is called. A named tool, or a single one, needs no forward.
- The arguments: structured.generate_json on `call_schema(tool)` (the name is written, not chosen), so
  they validate against the tool's parameters.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .config import IlladaError

MAX_TOOLS = 64
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_DESCRIPTION = 1024
CALL_PREFIX = '{"name":"'  # how every call's text begins: the canvas a name is scored on
EMPTY_ARGUMENTS = {"type": "object", "properties": {}}
MODES = ("auto", "required", "none")  # tool_choice's values besides a tool's name
MAX_CALLS = 16  # calls one assistant turn of a history may carry


class UnsupportedSchema(IlladaError):
    """A tool's parameters use a JSON schema feature structured output cannot build (the server: a 400 with
    code unsupported_schema)."""


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict = field(default_factory=lambda: dict(EMPTY_ARGUMENTS))
    description: str = ""


def parse_tools(tools: Any) -> list[Tool]:
    """An OpenAI `tools` list as Tools; IlladaError naming the first problem (its shape, a name, a
    parameters schema that structured output cannot compile)."""
    from .structured import compile_schema

    if not isinstance(tools, list) or not tools or len(tools) > MAX_TOOLS:
        raise IlladaError(f"tools must be a list of 1 to {MAX_TOOLS} functions")
    out, names = [], set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict):
            raise IlladaError(f'{where} must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}')
        name, desc = fn.get("name"), fn.get("description", "")
        if not isinstance(name, str) or not NAME.match(name):
            raise IlladaError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-'")
        if name in names:
            raise IlladaError(f"{where}.function.name {name!r} is offered twice")
        if not isinstance(desc, str) or len(desc) > MAX_DESCRIPTION:
            raise IlladaError(f"{where}.function.description must be text of at most {MAX_DESCRIPTION} characters")
        params = fn.get("parameters", EMPTY_ARGUMENTS)
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise IlladaError(f"{where}.function.parameters must be a JSON schema of type object")
        params = {"type": "object", **params}
        try:
            compile_schema(call_schema(Tool(name, params)))  # refuses what structured output cannot build
        except IlladaError as e:
            raise UnsupportedSchema(f"{where}.function.parameters: {e}") from None
        names.add(name)
        out.append(Tool(name, params, desc))
    return out


def _type_name(schema: dict) -> str:
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    if schema.get("type") == "array":
        return f"array of {_type_name(schema.get('items', {'type': 'string'}))}"
    return str(schema.get("type", "any"))


def signature(tool: Tool) -> str:
    """`name(arg: type, ...)`, then ` - description` when the tool has one."""
    props = tool.parameters.get("properties", {})
    args = ", ".join(f"{k}: {_type_name(v) if isinstance(v, dict) else 'any'}" for k, v in props.items())
    return f"{tool.name}({args})" + (f" - {tool.description}" if tool.description else "")


def tools_text(tools: list[Tool]) -> str:
    """The system text that offers `tools` to the model."""
    return "tools:\n" + "\n".join(signature(t) for t in tools)


def call_schema(tool: Tool) -> dict:
    """The JSON schema of a call to `tool`: its name, fixed, then its arguments."""
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
        "required": ["name", "arguments"],
    }


def call_length(tokenizer, tool: Tool, mask_id: int) -> int:
    """The canvas positions a call to `tool` takes (its template's tokens and holes)."""
    from .structured import template_length

    return template_length(tokenizer, call_schema(tool), mask_id)


def call_text(name: str, arguments: Any) -> str:
    """A call as the canvas writes it (and as the history shows it)."""
    return json.dumps({"name": name, "arguments": arguments}, separators=(",", ":"), ensure_ascii=False)


def result_text(content: str) -> str:
    """A tool's result as the user turn that carries it back to the model."""
    return f"tool: {content}"


# ------------------------------------------------------------------------------------------ conversations
def _call_of(call: Any, where: str) -> tuple[str, Any]:
    """(name, arguments) of a history's call, OpenAI's {"function": {"name", "arguments": JSON text}} or
    {"name", "arguments"}; IlladaError naming `where` when it is neither or its arguments are not JSON."""
    fn = call.get("function", call) if isinstance(call, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not NAME.match(name):
        raise IlladaError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-'")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            raise IlladaError(f"{where}.function.arguments is not JSON") from None
    return name, args


def plain_messages(messages: list[dict], tools: Optional[list[Tool]] = None) -> list[dict]:
    """An OpenAI conversation as the plain {role, content} turns the chat template takes: an assistant turn's
    `tool_calls` as its call texts, one a line (after its text, when it has some); a `tool` turn as the user
    turn `result_text(content)`; and `tools`, when given, offered in a system turn (`tools_text`) merged
    into the first message when that is a system turn (its text, a blank line, the tools), else put first."""
    out = []
    for i, m in enumerate(messages):
        role, content = m["role"], m.get("content") or ""
        if role == "tool":
            out.append({"role": "user", "content": result_text(content)})
            continue
        calls = m.get("tool_calls") or []
        texts = [call_text(*_call_of(c, f"messages[{i}].tool_calls[{j}]")) for j, c in enumerate(calls)]
        out.append({"role": role, "content": "\n".join(([content] if content else []) + texts)})
    if tools:
        text = tools_text(tools)
        if out and out[0]["role"] == "system":
            first = out[0]["content"]
            out[0] = {"role": "system", "content": f"{first}\n\n{text}" if first else text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


# ------------------------------------------------------------------------------------------ answering
@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: Any  # the parsed arguments (a dict, valid against the tool's parameters)

    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass
class ToolAnswer:
    call: Optional[ToolCall]  # None: no call (tool_choice "none", or "auto" decided to answer)
    text: Optional[str]  # the free-form answer when there is no call
    stats: Any  # decode.Stats: forwards and processed tokens of every step (decision, choice, fill or answer)
    spec: Any  # the DecodeSpec that ran (the template's for a call)


def check_choice(choice: Any, tools: list[Tool]) -> str:
    """`choice` when it is one of MODES or the name of one of `tools`; IlladaError otherwise."""
    if not isinstance(choice, str) or (choice not in MODES and choice not in {t.name for t in tools}):
        names = ", ".join(t.name for t in tools)
        raise IlladaError(f"tool choice must be auto, required, none or a tool's name ({names}), not {choice!r}")
    return choice


def _logprobs(model, x: list[int], at: list[int]) -> np.ndarray:
    """(len(at), V) log-probabilities at the canvas positions `at` from one forward of `x`."""
    import mlx.core as mx

    logits = model(mx.array([x], dtype=mx.int32), None, logits_at=mx.array(at))
    return np.array((logits - mx.logsumexp(logits, axis=-1, keepdims=True))[0].astype(mx.float32))


def wants_call(model, tokenizer, ids: list[int], block_length: int, stats) -> bool:
    """tool_choice auto: whether the answer is a call. One forward over the prompt and `block_length` masks:
    a call iff the likeliest token at the first answer position is CALL_PREFIX's first token."""
    first = tokenizer.encode(CALL_PREFIX, add_special_tokens=False)[0]
    x = list(ids) + [model.args.mask_token_id] * block_length
    logp = _logprobs(model, x, [len(ids)])
    stats.add_forwards(1, len(x))
    return int(np.argmax(logp[0])) == first


def pick_tool(model, tokenizer, ids: list[int], tools: list[Tool], block_length: int, stats) -> Tool:
    """The tool a call names: alone, it; else one forward over the prompt, CALL_PREFIX's tokens and masks (to
    `block_length` answer positions, more when a name needs them), and the tool whose name's tokens and
    then `"`'s have the largest summed log-probability right after the prefix."""
    if len(tools) == 1:
        return tools[0]
    prefix, quote = (tokenizer.encode(s, add_special_tokens=False) for s in (CALL_PREFIX, '"'))
    names = [tokenizer.encode(t.name, add_special_tokens=False) + quote for t in tools]
    longest = max(len(n) for n in names)
    start = len(ids) + len(prefix)
    x = list(ids) + prefix + [model.args.mask_token_id] * max(block_length - len(prefix), longest)
    logp = _logprobs(model, x, list(range(start, start + longest)))
    stats.add_forwards(1, len(x))
    scores = [sum(float(logp[j, t]) for j, t in enumerate(n)) for n in names]
    return tools[int(np.argmax(scores))]


def choose_tool(model, tokenizer, ids: list[int], tools: list[Tool], choice: str, block_length: int) -> tuple:
    """(the tool the answer calls or None for a free-form answer, the decode.Stats of the forwards that
    decided it), by `choice` (check_choice's values) on a canvas of `block_length` answer positions."""
    from .decode import Stats

    choice, stats = check_choice(choice, tools), Stats()
    if choice == "none":
        return None, stats
    if choice not in MODES:
        return next(t for t in tools if t.name == choice), stats
    if choice == "auto" and not wants_call(model, tokenizer, ids, block_length, stats):
        return None, stats
    return pick_tool(model, tokenizer, ids, tools, block_length, stats), stats


def fill_call(model, tokenizer, ids: list[int], tool: Tool, spec, stats) -> tuple[ToolCall, Any]:
    """The call to `tool`: its template (call_schema) filled by structured.generate_json under `spec`;
    (the call, the spec the template ran). Its forwards are added to `stats`."""
    from .structured import generate_json

    r = generate_json(model, tokenizer, ids, call_schema(tool), spec=spec)
    stats.add_forwards(r.stats.nfe, r.stats.processed)
    stats.output_tokens += len(tokenizer.encode(r.text, add_special_tokens=False))
    return ToolCall(tool.name, r.value["arguments"]), r.spec


def generate_tool_call(
    model, tokenizer, ids: list[int], tools: list[Tool], choice: str = "auto", spec=None, **settings
):
    """A ToolAnswer to the prompt `ids` (which should offer the tools: plain_messages) under `choice` ("auto",
    "required", "none" or a tool's name; see the module doc). spec: a resolved DecodeSpec (its block length
    is the decision's canvas; its rule, cache and sampling fill the call or write the answer), else
    make_spec's `settings`."""
    from .engine import stream_generate
    from .spec import make_spec

    spec = spec if spec is not None else make_spec(model, tokenizer, len(ids), **settings)
    tool, stats = choose_tool(model, tokenizer, ids, tools, choice, spec.block_length)
    if tool is not None:
        call, ran = fill_call(model, tokenizer, ids, tool, spec, stats)
        return ToolAnswer(call, None, stats, ran)
    parts, last = [], None
    for last in stream_generate(model, tokenizer, list(ids), spec=spec):
        parts.append(last.text)
    last.stats.add_forwards(stats.nfe, stats.processed)
    return ToolAnswer(None, "".join(parts), last.stats, spec)
