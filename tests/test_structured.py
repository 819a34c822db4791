"""Structured output's templates (illada_mlx/structured.py): valid by construction for any fill its rules
allow, checked with jsonschema on generated schemas."""

import json
import random
import zlib

import numpy as np
import pytest

from illada_mlx.config import IlladaError
from illada_mlx.structured import Layout, TokenClasses, compile_schema, render
from training.schemas import random_schema

jsonschema = pytest.importorskip("jsonschema")


def random_fill(layout: Layout, rng: random.Random) -> np.ndarray:
    """A fill as a diffusion decode might commit it: open positions in a random order, each a random token
    the layout allows at that moment."""
    canvas = layout.ids.copy()
    static = layout.static_allowed()
    open_ = [i for i in range(len(layout)) if static[i].any()]
    rng.shuffle(open_)
    for i in open_:
        choices = np.flatnonzero(layout.allowed(canvas, static)[i])
        canvas[i] = rng.choice(choices.tolist())
    return canvas


@pytest.fixture(scope="module")
def layout_of(demo):
    _, tok = demo
    classes = TokenClasses.of(tok, pad=tok.eos_token_id)
    return lambda schema: Layout(compile_schema(schema), tok, classes, mask_id=5)


def test_any_allowed_fill_of_200_schemas_validates(layout_of):
    rng = random.Random(0)
    for n in range(200):
        schema = random_schema(rng)
        layout = layout_of(schema)
        canvas = random_fill(layout, rng)
        chosen = {h: rng.randrange(len(o)) for h, o in layout.options.items()}
        out = json.loads(layout.render(canvas, chosen))
        jsonschema.validate(out, schema)  # raises on an invalid answer
        assert (canvas != 5).sum() == (layout.static_allowed().any(1) | (layout.hole < 0)).sum()


def test_the_device_rules_are_the_layout_s_rules(layout_of):
    # Layout.on_device (what the decode applies at every step) against Layout.allowed (numpy), on partial
    # fills of generated schemas at every position
    import mlx.core as mx

    rng = random.Random(7)
    for _ in range(20):
        layout = layout_of(random_schema(rng))
        full = random_fill(layout, rng)
        canvas = np.where(np.array([rng.random() < 0.5 for _ in full]), full, layout.ids)
        want = layout.allowed(canvas)
        prompt = [9, 9, 9]
        x = mx.array([prompt + canvas.tolist()])
        pos = mx.array([list(range(3, 3 + len(layout)))])
        got = np.array(layout.on_device(3)(x, pos))[0]
        np.testing.assert_array_equal(got, want)


def test_padding_runs_to_the_end_of_its_hole(layout_of):
    layout = layout_of({"type": "object", "properties": {"a": {"type": "string", "maxLength": 4}}})
    pad = layout.classes.pad
    at = np.flatnonzero(layout.hole == 0)
    canvas = layout.ids.copy()
    canvas[at[1]] = pad  # a pad at slot 1: slots 2, 3 may only pad; slot 0 may not (a token must come first)
    allowed = layout.allowed(canvas)
    assert allowed[at[2]].sum() == 1 and allowed[at[2], pad] and allowed[at[3], pad]
    canvas = layout.ids.copy()
    canvas[at[2]] = layout.tok.encode("x", add_special_tokens=False)[0]  # a token at slot 2: no pad before it
    assert not layout.allowed(canvas)[at[:2], pad].any() and layout.allowed(canvas)[at[3], pad]


def test_the_fixed_text_is_the_schema_s_skeleton(layout_of):
    layout = layout_of({"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]})
    text = layout.tok.decode([t for t in layout.ids.tolist() if t != 5])
    assert text == '{"answer":""}'
    assert render(layout.template, ["olleh"]) == '{"answer": "olleh"}'


def test_choices_take_the_likeliest_option(layout_of):
    layout = layout_of({"enum": ["yes", "no"]})
    logp = np.full((len(layout), len(layout.classes.text)), -10.0)
    at = np.flatnonzero(layout.hole == 0)
    for k, t in enumerate(layout.options[0][1]):  # "no" is likely
        logp[at[k], t] = -0.1
    logp[at[len(layout.options[0][1]) :], layout.classes.pad] = -0.1
    assert layout.render(layout.ids, layout.choose(logp)) == '"no"'


@pytest.mark.parametrize(
    "schema,needle",
    [
        ({"type": "object", "patternProperties": {}}, "'patternProperties'"),
        ({"oneOf": [{"type": "string"}]}, "'oneOf'"),
        ({"type": ["string", "null"]}, "a list of types is not supported"),
        (
            {"type": "object", "properties": {"a": {"type": "string", "pattern": "x"}}},
            "'pattern' at schema.properties.a",
        ),
        ({"type": "array", "minItems": 3, "maxItems": 1}, "minItems ≤ maxItems"),
        # 64 items of 64 items of ... would be 64**6 pieces: refused once the template passes the cap
        (
            {
                "type": "array",
                "minItems": 64,
                "items": {
                    "type": "array",
                    "minItems": 64,
                    "items": {"type": "array", "minItems": 64, "items": {"type": "array", "minItems": 64}},
                },
            },
            "over 4096 pieces",
        ),
    ],
)
def test_an_unsupported_schema_is_refused_by_name(schema, needle):
    with pytest.raises(IlladaError, match=needle.replace("[", r"\[")):
        compile_schema(schema)


@pytest.mark.parametrize(
    "mode", [pytest.param(m, marks=pytest.mark.slow) for m in ("exact", "variable")] + ["fast", "fast_fixed"]
)
@pytest.mark.parametrize("weights", ["demo", "random"])
def test_every_mode_answers_valid_json_on_trained_and_random_weights(demo, random_weights, mode, weights):
    from illada_mlx.engine import build_prompt
    from illada_mlx.structured import generate_json

    model, tok = demo
    model = model if weights == "demo" else random_weights
    rng = random.Random(zlib.crc32(f"{mode}-{weights}".encode()))
    ids = build_prompt(tok, [{"role": "user", "content": "reverse hello"}])
    for _ in range(3):
        schema = random_schema(rng)
        r = generate_json(model, tok, ids, schema, mode=mode, seed=0)
        jsonschema.validate(json.loads(r.text), schema)
        assert r.value == json.loads(r.text) and r.stats.nfe >= 1


def test_the_skeleton_costs_no_forwards(demo):
    # every value is a choice: one scoring forward and no denoising at all
    from illada_mlx.engine import build_prompt
    from illada_mlx.structured import generate_json

    model, tok = demo
    ids = build_prompt(tok, [{"role": "user", "content": "57+68="}])
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "c": {"enum": ["a", "b"]}}}
    r = generate_json(model, tok, ids, schema)
    assert r.stats.nfe == 1 and set(json.loads(r.text)) == {"ok", "c"}


def test_the_official_schedule_commits_one_open_position_a_step(demo):
    # exact mode's schedule spreads its commits over the open positions only (the official
    # get_num_transfer_tokens counts the block's masks, not its written text): one forward per open position,
    # each committing exactly one of them, plus the choices' scoring forward
    from illada_mlx.engine import build_prompt
    from illada_mlx.structured import generate_json

    model, tok = demo
    ids = build_prompt(tok, [{"role": "user", "content": "57+68="}])
    layout = Layout(compile_schema(SKELETON_SCHEMA), tok, TokenClasses.of(tok, pad=tok.eos_token_id), 5)
    choice = {h.index for h in layout.template.holes if h.kind == "choice"}
    n_open = int(sum(h >= 0 and h not in choice for h in layout.hole.tolist()))
    seen = []
    r = generate_json(model, tok, ids, SKELETON_SCHEMA, mode="exact", seed=0, on_step=seen.append)
    assert r.stats.nfe == n_open + 1
    assert [int(s.filled.sum()) for s in seen[1:]] == [1] * n_open


SKELETON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "n": {"type": "integer", "minimum": 0, "maximum": 999},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "bc"]}, "minItems": 2, "maxItems": 2},
    },
}


@pytest.mark.parametrize("mode", ["fast", "variable"])
def test_on_step_starts_from_the_skeleton_and_only_fills_holes(demo, mode):
    # the steps generate_json reports against the layout computed here: step 0 is the skeleton (fixed text,
    # choices filled, every other hole masked), each later step writes only positions still masked, and the
    # last canvas is the one the answer was read from
    from illada_mlx.engine import build_prompt
    from illada_mlx.structured import generate_json

    model, tok = demo
    a = model.args
    layout = Layout(compile_schema(SKELETON_SCHEMA), tok, TokenClasses.of(tok, a.eos_token_id), a.mask_token_id)
    fixed = layout.hole < 0
    choice = np.isin(layout.hole, list(layout.options))
    ids = build_prompt(tok, [{"role": "user", "content": "reverse hello"}])
    steps = []
    r = generate_json(model, tok, ids, SKELETON_SCHEMA, mode=mode, on_step=steps.append)
    assert [s.step for s in steps] == list(range(len(steps))) and len(steps) >= 2
    first = steps[0]
    np.testing.assert_array_equal(first.fixed, fixed)
    np.testing.assert_array_equal(first.answer[fixed], layout.ids[fixed])
    np.testing.assert_array_equal(first.filled, choice)
    np.testing.assert_array_equal(first.masked, ~fixed & ~choice)
    before = first.answer
    for s in steps[1:]:
        changed = s.answer != before
        np.testing.assert_array_equal(changed, s.filled)  # what it says it filled, nothing else
        assert not (s.filled & (before != a.mask_token_id)).any()  # only masks get filled
        before = s.answer
    assert not steps[-1].masked.any()
    np.testing.assert_array_equal(steps[-1].answer, r.answer)
    assert generate_json(model, tok, ids, SKELETON_SCHEMA, mode=mode).text == r.text  # on_step changes nothing


def test_choices_of_one_option_cost_no_forward(demo):
    # a const (a tool call's name) is written, not scored: a schema of consts runs no forward at all (counted
    # at the model), and with an enum of two beside it the one scoring forward comes back
    from illada_mlx.engine import build_prompt
    from illada_mlx.structured import generate_json

    model, tok = demo
    seen = []

    class Counted:
        args = model.args

        def __call__(self, *a, **kw):
            seen.append(1)
            return model(*a, **kw)

    ids = build_prompt(tok, [{"role": "user", "content": "57+68="}])
    consts = {"type": "object", "properties": {"name": {"const": "add"}, "v": {"const": 3}}}
    r = generate_json(Counted(), tok, ids, consts)
    assert seen == [] and r.stats.nfe == 0 and r.value == {"name": "add", "v": 3}
    r = generate_json(Counted(), tok, ids, {**consts, "properties": {**consts["properties"], "e": {"enum": [1, 2]}}})
    assert len(seen) == r.stats.nfe == 1 and r.value["name"] == "add"


def test_generate_json_schema_prints_valid_json(tmp_path):
    from click.testing import CliRunner

    from illada_mlx.cli import main

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}}}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    r = CliRunner().invoke(main, ["generate", "-p", "57+68=", "--json-schema", str(path)])
    assert r.exit_code == 0, r.output
    jsonschema.validate(json.loads(r.stdout.strip()), schema)
    path.write_text('{"type": "object", "patternProperties": {}}')
    r = CliRunner().invoke(main, ["generate", "-p", "x", "--json-schema", str(path)])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "'patternProperties'" in r.output


# ------------------------------------------------------------------------------------------ the server
def test_the_server_answers_a_json_schema_valid_streamed_or_whole(demo_server):
    import httpx

    schema = {"type": "object", "properties": {"sum": {"type": "integer"}, "ok": {"type": "boolean"}}}
    body = {
        "messages": [{"role": "user", "content": "57+68="}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    }
    with httpx.Client(base_url=demo_server.url, timeout=120) as h:
        r = h.post("/chat/completions", json=body).json()
        jsonschema.validate(json.loads(r["choices"][0]["message"]["content"]), schema)
        assert r["choices"][0]["finish_reason"] == "stop" and r["diffusion_stats"]["nfe"] >= 1
        lines = [x for x in h.post("/chat/completions", json={**body, "stream": True}).text.splitlines() if x]
        text = "".join(
            c["choices"][0]["delta"].get("content") or ""
            for c in (json.loads(x[6:]) for x in lines if x.startswith("data: {"))
            if c["choices"]
        )
        jsonschema.validate(json.loads(text), schema)
        r = h.post("/completions", json={"prompt": "57+68=", "response_format": {"type": "json_object"}}).json()
        assert isinstance(json.loads(r["choices"][0]["text"]), dict)


@pytest.mark.parametrize(
    "response_format,needle",
    [
        ({"type": "json_schema", "json_schema": {"schema": {"oneOf": []}}}, "'oneOf'"),
        ({"type": "yaml"}, "response_format.type"),
        ({"type": "json_schema", "json_schema": {"schema": []}}, "schema must be a JSON schema object"),
    ],
)
def test_an_unsupported_response_format_is_a_400_naming_it(demo_server, response_format, needle):
    import httpx

    body = {"messages": [{"role": "user", "content": "hi"}], "response_format": response_format}
    r = httpx.post(demo_server.url + "/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and needle in r.json()["error"]["message"]


def test_the_openai_clients_parse_helper_gets_a_pydantic_object(client):
    pydantic = pytest.importorskip("pydantic")

    class Answer(pydantic.BaseModel):
        answer: str
        confident: bool

    r = client.chat.completions.parse(
        model="illada-demo", messages=[{"role": "user", "content": "reverse hello"}], response_format=Answer
    )
    assert isinstance(r.choices[0].message.parsed, Answer)


class Broken:
    """The demo model, failing at its first forward (a bug of ours, as the server sees it)."""

    def __init__(self, model):
        self.args = model.args

    def __call__(self, *a, **kw):
        raise RuntimeError("broken forward")


def test_a_failed_structured_decode_answers_its_request(demo):
    # the choice being decoded gets the failure (a 500 naming it) rather than waiting for ever
    import httpx
    from test_server import Server

    s = Server(Broken(demo[0]), demo[1], "illada-demo")
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "string"}}},
    }
    try:
        r = httpx.post(s.url + "/chat/completions", json=body, timeout=30)
        assert r.status_code == 500 and "broken forward" in r.json()["error"]["message"]
    finally:
        s.stop()
