"""The demo model's structured-output tasks: its five tasks answered inside JSON, and tool calls.

Tools (`CATALOG`, OpenAI's format): `add(a: integer, b: integer)` for addition prompts, `reverse(text:
string)` for reversing prompts, and `now()`, which no prompt needs. A request's tools are shown as
illada_mlx.tools renders them (a system turn merged into the user turn), so the rows here are the text the
runtime shows. Free-form rows (`TOOL_TASKS`, drawn through demo_tasks.examples like any task):
- `tool_call`: an addition or reversing prompt whose tool is offered: the answer is the call's text
  (`{"name":"add","arguments":{"a":57,"b":68}}`), which teaches the first token `{` ("auto" calls when it
  is the most likely first token) and the name after `{"name":"` (how a tool is chosen);
- `tool_plain`: a prompt whose tool is not offered (any of the five tasks): the plain answer;
- `tool_result`: the round trip: the call, then its result as a `tool:` user turn: the plain answer.
Template rows (`template_batches`): the canvas structured.py decodes, its skeleton written and its holes
filled with the right value (EOS padding to each hole's end), only the holes maskable:
- `json`: a task's answer as `{"<key>": value}` (`answer_schema`: integer for add and recall, string
  otherwise), the key and a string's maxLength varied so the model reads the skeleton it is given;
- `args`: a call's arguments inside `call_schema(tool)`'s skeleton, its name written.
A row's split is its base prompt's (demo_tasks.held_out), so held-out tool and JSON prompts are held out as
plain prompts too."""

from __future__ import annotations

import random
import re

import numpy as np

from illada_mlx.structured import Layout, compile_schema
from illada_mlx.tools import call_schema, call_text, parse_tools, result_text, tools_text
from training.demo_tasks import TASKS, draw

MASK, EOS = 5, 2
_INT = {"type": "integer"}
CATALOG = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {"type": "object", "properties": {"a": _INT, "b": _INT}, "required": ["a", "b"]},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "reverse",
            "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
        },
    },
    {"type": "function", "function": {"name": "now"}},
]
TOOLS = {t.name: t for t in parse_tools(CATALOG)}
TOOL_FOR = {"add": "add", "reverse": "reverse"}  # the task a tool answers
TOOL_TASKS = ("tool_call", "tool_plain", "tool_result")
KEYS = ("answer", "result", "value", "output")


def arguments(task: str, prompt: str) -> dict:
    """The right call's arguments for a base prompt of `task` (add or reverse)."""
    if task == "add":
        a, b = re.match(r"(\d+)\+(\d+)=", prompt).groups()
        return {"a": int(a), "b": int(b)}
    return {"text": prompt.split(" ", 1)[1]}


def with_tools(tools: list, prompt: str) -> str:
    """The user turn the runtime shows for `prompt` with `tools` offered (the tools' system turn merged in)."""
    return f"{tools_text(tools)}\n\n{prompt}"


def _offer(rng: random.Random, need: str | None, avoid: str | None) -> list:
    names = [n for n in TOOLS if n != avoid and n != need]
    picked = rng.sample(names, rng.randint(0 if need else 1, len(names))) + ([need] if need else [])
    rng.shuffle(picked)
    return [TOOLS[n] for n in picked]


def make(task: str, rng: random.Random, split: str):
    """(messages, answer) of a free-form tool task, its base prompt from `split`."""
    if task == "tool_plain":
        base = rng.choice(TASKS)
        p, a = draw(base, rng, split)
        return [{"role": "user", "content": with_tools(_offer(rng, None, TOOL_FOR.get(base)), p)}], a
    base = rng.choice(tuple(TOOL_FOR))
    p, a = draw(base, rng, split)
    tools = _offer(rng, TOOL_FOR[base], None)
    call = call_text(TOOL_FOR[base], arguments(base, p))
    messages = [{"role": "user", "content": with_tools(tools, p)}]
    if task == "tool_call":
        return messages, call
    return messages + [{"role": "assistant", "content": call}, {"role": "user", "content": result_text(a)}], a


def answer_schema(task: str, key: str = "answer", max_length: int | None = None) -> dict:
    """The JSON-wrapped form of `task`'s answer: integer for add and recall, else a string."""
    value = dict(_INT) if task in ("add", "recall") else {"type": "string"}
    if max_length is not None and value["type"] == "string":
        value["maxLength"] = max_length
    return {"type": "object", "properties": {key: value}, "required": [key]}


def answer_value(task: str, answer: str, key: str = "answer") -> dict:
    return {key: int(answer) if task in ("add", "recall") else answer}


class TokenizerView:
    """The Rust tokenizer as structured.Layout reads a tokenizer (encode → ids, decode)."""

    def __init__(self, tok):
        self.tok = tok

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids))


def _hole_texts(node, value, out: dict) -> None:
    """Each hole's fill for `value` (structured.read_value's inverse): text, or a choice's option index."""
    if node.kind == "object":
        for k, c in zip(node.keys, node.children):
            _hole_texts(c, value[k], out)
    elif node.kind == "array":
        for c, v in zip(node.children, value):
            _hole_texts(c, v, out)
    elif node.kind in ("enum", "boolean"):
        out[node.holes[0].index] = list(node.holes[0].options).index(value)
    elif node.kind in ("string", "integer"):
        out[node.holes[0].index] = str(value)


def filled_canvas(layout: Layout, value) -> tuple[np.ndarray, np.ndarray]:
    """(canvas ids, maskable): the template with every hole holding `value`'s text and EOS padding to its end
    (a choice: its option), and which positions are open holes. ValueError when a value does not fit."""
    texts: dict = {}
    _hole_texts(layout.template.root, value, texts)
    ids, open_ = layout.ids.copy(), np.zeros(len(layout), dtype=bool)
    for hole in layout.template.holes:
        at = np.flatnonzero(layout.hole == hole.index)
        fill = texts[hole.index]
        toks = layout.options[hole.index][fill] if hole.kind == "choice" else layout.tok.encode(fill)
        if len(toks) > len(at):
            raise ValueError(f"{fill!r} does not fit its {len(at)}-token hole")
        ids[at] = toks + [EOS] * (len(at) - len(toks))
        open_[at] = hole.kind != "choice"
    return ids, open_


def template_item(rng: random.Random, view: TokenizerView, split: str = "train"):
    """(messages, canvas ids, maskable) of one template row: a JSON-wrapped task or a call's arguments."""
    if rng.random() < 0.5:
        task = rng.choice(TASKS)
        p, a = draw(task, rng, split)
        key, length = rng.choice(KEYS), rng.choice((None, None, max(len(a), 12), 16))
        schema, value = answer_schema(task, key, length), answer_value(task, a, key)
        messages = [{"role": "user", "content": p}]
    else:
        task = rng.choice(tuple(TOOL_FOR))
        p, _ = draw(task, rng, split)
        tool = TOOLS[TOOL_FOR[task]]
        schema, value = call_schema(tool), {"name": tool.name, "arguments": arguments(task, p)}
        messages = [{"role": "user", "content": with_tools(_offer(rng, tool.name, None), p)}]
    layout = Layout(compile_schema(schema), view, None, MASK)  # filled, not decoded: no token classes
    ids, open_ = filled_canvas(layout, value)
    return messages, ids, open_


def template_batches(tok, seed: int, batch: int, render):
    """Endless (ids, answer, valid, prompt_maskable, masked_from) batches of template rows (train_rows'
    batch format): only the holes are answer (maskable), the skeleton and prompt never are."""
    rng, view = random.Random(seed), TokenizerView(tok)
    while True:
        rows = []
        while len(rows) < batch:
            try:
                m, canvas, open_ = template_item(rng, view)
            except ValueError:
                continue  # a value longer than its hole: drawn again
            rows.append((tok.encode(render(m)).ids, canvas, open_))
        width = max(len(q) + len(c) for q, c, _ in rows)
        ids = np.full((batch, width), EOS, dtype=np.int64)
        answer = np.zeros((batch, width), dtype=bool)
        valid = np.zeros((batch, width), dtype=bool)
        for j, (q, c, o) in enumerate(rows):
            ids[j, : len(q) + len(c)] = q + c.tolist()
            answer[j, len(q) : len(q) + len(c)] = o
            valid[j, : len(q) + len(c)] = True
        yield ids, answer, valid, np.zeros(batch, dtype=bool), np.full(batch, -1, dtype=np.int64)
