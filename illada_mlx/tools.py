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
  `tool` turn is a user turn `tool: <result>` (chat templates without a tool role accept it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .config import IlladaError

MAX_TOOLS = 64
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_DESCRIPTION = 1024
CALL_PREFIX = '{"name":"'  # how every call's text begins: the canvas a name is scored on
EMPTY_ARGUMENTS = {"type": "object", "properties": {}}


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
        compile_schema(call_schema(Tool(name, params)))  # refuses what structured output cannot build
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


def call_text(name: str, arguments: Any) -> str:
    """A call as the canvas writes it (and as the history shows it)."""
    return json.dumps({"name": name, "arguments": arguments}, separators=(",", ":"), ensure_ascii=False)


def result_text(content: str) -> str:
    """A tool's result as the user turn that carries it back to the model."""
    return f"tool: {content}"
