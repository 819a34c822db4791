"""Tool calling (illada_mlx/tools.py): the decision rule against a model whose logits the test sets (an
independent float64 re-derivation of auto's decision and of the name's scores), calls that validate against
their tool's parameters on trained and random weights, the history's rendering, and the server's OpenAI
shapes through the official client."""

import random
from types import SimpleNamespace

import numpy as np
import pytest

from illada_mlx.config import IlladaError
from illada_mlx.engine import build_prompt
from illada_mlx.tools import (
    CALL_PREFIX,
    UnsupportedSchema,
    call_schema,
    choose_tool,
    generate_tool_call,
    parse_tools,
    plain_messages,
)
from training.schemas import random_schema

jsonschema = pytest.importorskip("jsonschema")


def fn(name, properties=None, **extra):
    params = {"type": "object", "properties": properties or {}, **extra}
    return {"type": "function", "function": {"name": name, "parameters": params}}


ADD = fn("add", {"a": {"type": "integer"}, "b": {"type": "integer"}}, required=["a", "b"])
WEATHER = fn("get_weather", {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}})
NOTE = fn("note", {"text": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}})
FLAG = fn("a", {"on": {"type": "boolean"}, "level": {"type": "number", "minimum": 0, "maximum": 10}})


class Scripted:
    """A model whose logits the test gives: `table(position)` -> (V,) at each canvas position asked for;
    every forward's canvas is recorded."""

    def __init__(self, args, table):
        self.args, self.table, self.canvases = args, table, []

    def __call__(self, x, mask=None, logits_at=None, **_):
        import mlx.core as mx

        self.canvases.append(np.array(x)[0].tolist())
        return mx.array(np.stack([self.table(int(p)) for p in np.array(logits_at)])[None])


@pytest.fixture(scope="module")
def tok(demo):
    return demo[1]


@pytest.fixture(scope="module")
def args(demo):
    a = demo[0].args
    return SimpleNamespace(mask_token_id=a.mask_token_id, vocab_size=a.vocab_size)


def encode(tok, s):
    return tok.encode(s, add_special_tokens=False)


def log_softmax64(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float64)
    return v - (v.max() + np.log(np.exp(v - v.max()).sum()))


# ------------------------------------------------------------------------------------------ the decision
@pytest.mark.parametrize("seed", range(6))
def test_auto_calls_iff_the_first_answer_position_s_argmax_is_the_brace(tok, args, seed):
    rng = np.random.default_rng(seed)
    ids = encode(tok, "prompt")
    brace = encode(tok, "{")[0]
    first = rng.normal(size=args.vocab_size).astype(np.float32)
    if seed % 2:  # the brace likeliest, else second
        first[brace] = first.max() + 0.5
    else:
        first[brace] = np.sort(first)[-2]
    table = lambda p: first if p == len(ids) else rng.normal(size=args.vocab_size).astype(np.float32)  # noqa: E731
    model = Scripted(args, table)
    tools = parse_tools([ADD])
    tool, stats = choose_tool(model, tok, ids, tools, "auto", 16)
    want_call = int(np.argmax(first)) == brace  # the oracle: the rule on the logits as given
    assert (tool is not None) == want_call == bool(seed % 2)
    assert model.canvases[0] == ids + [args.mask_token_id] * 16 and len(model.canvases) == 1
    assert stats.nfe == 1 and stats.processed == len(ids) + 16


@pytest.mark.parametrize("seed", range(8))
def test_the_tool_called_has_the_likeliest_name_and_quote_after_the_prefix(tok, args, seed):
    rng = np.random.default_rng(100 + seed)
    ids = encode(tok, "which?")
    logits = {}

    def table(p):
        if p not in logits:
            logits[p] = (rng.normal(size=args.vocab_size) * 3).astype(np.float32)
        return logits[p]

    tools = parse_tools([ADD, WEATHER, NOTE, FLAG])
    model = Scripted(args, table)
    tool, stats = choose_tool(model, tok, ids, tools, "required", 8)
    prefix = encode(tok, CALL_PREFIX)
    names = [encode(tok, t.name) + encode(tok, '"') for t in tools]
    start = len(ids) + len(prefix)
    scores = [sum(log_softmax64(logits[start + j])[t] for j, t in enumerate(n)) for n in names]
    assert tool.name == tools[int(np.argmax(scores))].name
    # one forward: the prompt, the prefix, masks to 8 answer positions or the longest name and quote
    answer = max(8, len(prefix) + max(map(len, names)))
    assert model.canvases == [ids + prefix + [args.mask_token_id] * (answer - len(prefix))]
    assert stats.nfe == 1 and stats.processed == len(ids) + answer


def test_a_named_or_single_tool_or_none_runs_no_forward(tok, args):
    model = Scripted(args, lambda p: np.zeros(args.vocab_size, np.float32))
    two, one = parse_tools([ADD, WEATHER]), parse_tools([WEATHER])
    for tools, choice, want in (
        (two, "get_weather", "get_weather"),
        (one, "required", "get_weather"),
        (two, "none", None),
    ):
        tool, stats = choose_tool(model, tok, [1, 2, 3], tools, choice, 32)
        assert (tool.name if tool else None) == want and stats.nfe == 0
    assert model.canvases == []
    with pytest.raises(IlladaError, match="tool choice"):
        choose_tool(model, tok, [1], two, "nope", 32)


# ------------------------------------------------------------------------------------------ the call
@pytest.fixture(scope="module")
def random_weights(demo):
    import mlx.core as mx

    from illada_mlx.model import Model

    mx.random.seed(3)
    model = Model(demo[0].args)
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("weights", ["demo", "random"])
def test_every_call_validates_against_its_tool_s_parameters(demo, random_weights, weights):
    model = demo[0] if weights == "demo" else random_weights
    tok = demo[1]
    rng = random.Random(5)
    extra = [fn(f"t{i}", {"x": random_schema(rng), "y": {"type": "integer", "minimum": -5}}) for i in range(3)]
    tools = parse_tools([ADD, WEATHER, NOTE, FLAG, *extra])
    ids = build_prompt(tok, plain_messages([{"role": "user", "content": "57+68="}], tools))
    for choice in ["required", "auto"] + [t.name for t in tools]:
        r = generate_tool_call(model, tok, ids, tools, choice, mode="fast")
        if r.call is None:  # auto may answer
            assert choice == "auto" and isinstance(r.text, str)
            continue
        tool = next(t for t in tools if t.name == r.call.name)
        assert choice in ("required", "auto", tool.name)
        jsonschema.validate(r.call.arguments, tool.parameters)
        jsonschema.validate({"name": tool.name, "arguments": r.call.arguments}, call_schema(tool))


def test_a_call_s_figures_are_its_steps_summed(demo):
    from illada_mlx.spec import make_spec
    from illada_mlx.structured import generate_json

    model, tok = demo
    tools = parse_tools([ADD, WEATHER])
    ids = build_prompt(tok, plain_messages([{"role": "user", "content": "57+68="}], tools))
    spec = make_spec(model, tok, len(ids), mode="fast")
    r = generate_tool_call(model, tok, ids, tools, "required", spec=spec)
    tool = next(t for t in tools if t.name == r.call.name)
    alone = generate_json(model, tok, ids, call_schema(tool), spec=spec)  # the fill, measured by itself
    prefix, longest = len(encode(tok, CALL_PREFIX)), max(len(encode(tok, t.name + '"')) for t in tools)
    scoring = len(ids) + max(spec.block_length, prefix + longest)
    assert r.call.arguments == alone.value["arguments"]
    assert (r.stats.nfe, r.stats.processed) == (1 + alone.stats.nfe, scoring + alone.stats.processed)
    named = generate_tool_call(model, tok, ids, tools, tool.name, spec=spec)
    assert (named.stats.nfe, named.stats.processed) == (alone.stats.nfe, alone.stats.processed)
    none = generate_tool_call(model, tok, ids, tools, "none", spec=spec)
    assert none.call is None and isinstance(none.text, str) and none.stats.nfe >= 1


# ------------------------------------------------------------------------------------------ the prompt
def test_a_history_with_calls_and_results_is_plain_turns():
    tools = parse_tools([ADD])
    history = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "57+68="},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 57, "b": 68}'}},
                {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "125"},
    ]
    assert plain_messages(history, tools) == [
        {"role": "system", "content": "be brief\n\ntools:\nadd(a: integer, b: integer)"},
        {"role": "user", "content": "57+68="},
        {
            "role": "assistant",
            "content": '{"name":"add","arguments":{"a":57,"b":68}}\n{"name":"add","arguments":{"a":1,"b":2}}',
        },
        {"role": "user", "content": "tool: 125"},
    ]
    assert plain_messages(history[1:2], tools)[0] == {
        "role": "system",
        "content": "tools:\nadd(a: integer, b: integer)",
    }
    bad = [{"role": "assistant", "tool_calls": [{"function": {"name": "add", "arguments": "{a"}}]}]
    with pytest.raises(IlladaError, match=r"messages\[0\].tool_calls\[0\].function.arguments is not JSON"):
        plain_messages(bad)


def test_a_tool_whose_parameters_cannot_be_built_is_refused_by_name():
    with pytest.raises(UnsupportedSchema, match=r"tools\[0\].function.parameters.*'oneOf'"):
        parse_tools([fn("f", {"x": {"oneOf": [{"type": "string"}]}})])
    with pytest.raises(IlladaError, match="offered twice"):
        parse_tools([ADD, ADD])
