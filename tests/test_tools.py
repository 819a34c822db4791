"""Tool calling (illada_mlx/tools.py): the decision rule against a model whose logits the test sets (an
independent float64 re-derivation of auto's decision and of the name's scores), calls that validate against
their tool's parameters on trained and random weights, the history's rendering, and the server's OpenAI
shapes through the official client."""

import json
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
NOTE = fn(
    "note", {"text": {"type": "string", "maxLength": 8}, "tags": {"type": "array", "items": {"enum": ["x", "y"]}}}
)
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
@pytest.mark.parametrize("weights", ["demo", "random"])
@pytest.mark.parametrize("generated", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_every_call_validates_against_its_tool_s_parameters(demo, random_weights, weights, generated):
    # hand-written tools; and (slow) tools whose parameters are generated schemas, larger templates
    model = demo[0] if weights == "demo" else random_weights
    tok = demo[1]
    rng = random.Random(5)
    extra = [fn(f"t{i}", {"x": random_schema(rng), "y": {"type": "integer", "minimum": -5}}) for i in range(3)]
    tools = parse_tools(extra if generated else [ADD, WEATHER, NOTE, FLAG])
    ids = build_prompt(tok, plain_messages([{"role": "user", "content": "57+68="}], tools))
    for choice in ["required", "auto"] + [t.name for t in tools]:
        r = generate_tool_call(model, tok, ids, tools, choice, mode="fast", max_tokens=32)
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


# ------------------------------------------------------------------------------------------ the server
def test_the_openai_client_calls_a_tool_and_reads_the_answer_to_its_result(client):
    messages = [{"role": "user", "content": "57+68="}]
    r = client.chat.completions.create(model="illada-demo", messages=messages, tools=[ADD], tool_choice="required")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "add" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), ADD["function"]["parameters"])
    assert r.model_extra["diffusion_stats"]["nfe"] >= 1 and r.usage.completion_tokens > 0
    messages += [choice.message, {"role": "tool", "tool_call_id": call.id, "content": "125"}]
    again = client.chat.completions.create(model="illada-demo", messages=messages)
    assert again.choices[0].finish_reason in ("stop", "length") and isinstance(again.choices[0].message.content, str)
    none = client.chat.completions.create(model="illada-demo", messages=messages, tools=[ADD], tool_choice="none")
    assert none.choices[0].message.tool_calls is None and isinstance(none.choices[0].message.content, str)


def test_a_streamed_call_arrives_as_tool_call_chunks(client):
    chunks = list(
        client.chat.completions.create(
            model="illada-demo",
            messages=[{"role": "user", "content": "weather in Paris"}],
            tools=[ADD, WEATHER],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            stream=True,
        )
    )
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    (call,) = calls
    assert call.index == 0 and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_a_tool_named_like_a_mode_is_called_by_name(client):
    none = fn("none", {"k": {"enum": [1, 2]}})
    r = client.chat.completions.create(
        model="illada-demo",
        messages=[{"role": "user", "content": "x"}],
        tools=[ADD, none],
        tool_choice={"type": "function", "function": {"name": "none"}},
    )
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "none" and json.loads(call.function.arguments)["k"] in (1, 2)


def test_auto_answers_as_the_library_decides(client, demo):
    model, tok = demo
    tools = parse_tools([ADD])
    messages = [{"role": "user", "content": "57+68="}]
    ids = build_prompt(tok, plain_messages(messages, tools))
    want = generate_tool_call(model, tok, ids, tools, "auto")
    r = client.chat.completions.create(model="illada-demo", messages=messages, tools=[ADD])
    m = r.choices[0].message
    chunks = list(client.chat.completions.create(model="illada-demo", messages=messages, tools=[ADD], stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    if want.call is None:  # an ordinary answer, whole and streamed, its decision's forward counted
        assert m.tool_calls is None and m.content == want.text == streamed and not calls
        assert r.choices[0].finish_reason != "tool_calls"
        assert r.model_extra["diffusion_stats"]["nfe"] == want.stats.nfe
    else:
        assert m.tool_calls[0].function.name == want.call.name == calls[0].function.name


@pytest.mark.parametrize(
    "extra,param,code",
    [
        ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "sub"}}}, "tool_choice", None),
        ({"tool_choice": "required"}, "tool_choice", None),
        ({"tools": [ADD], "response_format": {"type": "json_object"}}, "response_format", None),
        ({"tools": [ADD], "n": 2}, "n", None),
        ({"tools": [ADD], "logprobs": True}, "tools", None),
        ({"tools": [fn("f", {"x": {"type": "string", "pattern": "a"}})]}, "tools", "unsupported_schema"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools", None),
        ({"tools": "add"}, "tools", None),
        # a call whose template cannot fit one block after the prompt
        (
            {
                "tools": [
                    fn("f", {"x": {"type": "array", "minItems": 64, "items": {"maxLength": 64, "type": "string"}}})
                ]
            },
            "tools",
            "context_length_exceeded",
        ),
        # and a response_format schema's template likewise
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "big",
                        "schema": {"type": "array", "minItems": 64, "items": {"maxLength": 64, "type": "string"}},
                    },
                }
            },
            "response_format",
            "context_length_exceeded",
        ),
    ],
)
def test_what_tools_cannot_do_is_a_400_naming_the_parameter(demo_server, extra, param, code):
    import httpx

    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **extra}
    r = httpx.post(demo_server.url + "/chat/completions", json=body, timeout=60)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param and err["code"] == code, err
    assert "\n" not in err["message"]


@pytest.mark.parametrize(
    "messages,param",
    [
        (
            [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{"}}],
                },
            ],
            "messages[1].tool_calls[0].function.arguments",
        ),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{"function": {"name": 5}}]}],
            "messages[1].tool_calls[0].function.name",
        ),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [{}] * 17}], "messages[1].tool_calls"),
        (
            [{"role": "user", "content": "x"}, {"role": "user", "content": "y", "tool_calls": [{}]}],
            "messages[1].tool_calls",
        ),
        ([{"role": "function", "content": "x"}], "messages[0].role"),
        ([{"role": "tool", "content": "x"}], "messages"),
        ([{"role": "user", "content": "x"}, {"role": "tool", "content": None}], "messages[1].content"),
    ],
)
def test_a_hostile_history_is_a_400_naming_the_field(demo_server, messages, param):
    import httpx

    r = httpx.post(demo_server.url + "/chat/completions", json={"messages": messages, "max_tokens": 8}, timeout=60)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param, err


def test_tools_on_completions_are_refused(demo_server):
    import httpx

    body = {"prompt": "57+68=", "tools": [ADD], "max_tokens": 8}
    r = httpx.post(demo_server.url + "/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
