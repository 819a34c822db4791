"""The OpenAI-compatible server on a free loopback port, driven by the official `openai` client."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fixtures import reply

from illada_mlx.engine import generate_text
from illada_mlx.load import load
from illada_mlx.server import Options, Scheduler, make_app, make_server

FAST = {"mode": "fast"}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model, tok, name, max_queue=32, opts=None, max_batch=8, max_request_seconds=600.0, **kw):
        self.engine = Scheduler(model, tok, name, max_queue, max_batch, max_request_seconds)
        self.port = _free_port()
        self.server = make_server(make_app(self.engine, opts), "127.0.0.1", self.port, "error", **kw)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(100):
            if self.server.started:
                break
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=5)


def test_models_endpoint(client):
    assert [m.id for m in client.models.list().data] == ["illada-demo"]


def direct(demo, text, mode="fast", max_tokens=32):
    """The same prompt decoded without the server (T = 0 is deterministic)."""
    model, tok = demo
    return reply(model, tok, [{"role": "user", "content": text}], mode=mode, max_tokens=max_tokens)


def test_chat_completion_non_streamed(client, demo):
    r = client.chat.completions.create(
        model="illada-demo",
        messages=[{"role": "user", "content": "reverse abc"}],
        max_tokens=32,
        extra_body={"diffusion": FAST},
    )
    text, tokens, last = direct(demo, "reverse abc")
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == last.finish_reason and r.usage.completion_tokens == len(tokens)


def test_chat_completion_streamed_block_by_block(client, demo):
    stream = client.chat.completions.create(
        model="illada-demo",
        stream=True,
        max_tokens=64,
        messages=[{"role": "user", "content": "sort 3 1 2"}],
        extra_body={"diffusion": {"mode": "variable", "block_length": 8, "steps_per_block": 8}},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    model, tok = demo
    want, _, last = reply(
        model,
        tok,
        [{"role": "user", "content": "sort 3 1 2"}],
        mode="variable",
        max_tokens=64,
        block_length=8,
        steps_per_block=8,
    )
    assert text == want
    assert chunks[-1].choices[0].finish_reason == last.finish_reason
    assert chunks[0].choices[0].delta.role == "assistant" and not any(c.choices[0].delta.role for c in chunks[1:])
    assert len(chunks) - 2 <= last.stats.blocks  # the role, at most one text chunk per committed block, the end


def test_completions_endpoint_with_stop(client, demo):
    full = direct(demo, "reverse abc")[0]
    prompt = "<|im_start|>user\nreverse abc<|im_end|>\n<|im_start|>assistant\n"
    stop = full[1:2] or "x"
    r = client.completions.create(
        model="illada-demo", max_tokens=32, stop=[stop], prompt=prompt, extra_body={"diffusion": FAST}
    )
    assert r.choices[0].text == (full[: full.find(stop)] if stop in full else full)


@pytest.mark.slow  # concurrent requests through the whole server
def test_concurrent_requests_all_complete_correctly(client, demo):
    model, tok = demo
    prompts = ["reverse abc", "reverse xyz", "sort 2 1", "a=4 b=8 ; b?"]
    expected = {
        p: generate_text(model, tok, [{"role": "user", "content": p}], mode="fast", max_tokens=32) for p in prompts
    }

    def ask(i):
        p = prompts[i % len(prompts)]
        r = client.chat.completions.create(
            model="illada-demo",
            max_tokens=32,
            extra_body={"diffusion": FAST},
            messages=[{"role": "user", "content": p}],
        )
        return p, r.choices[0].message.content

    with ThreadPoolExecutor(20) as ex:
        results = list(ex.map(ask, range(20)))
    assert len(results) == 20
    assert all(text == expected[p] for p, text in results)


@pytest.mark.slow  # a 1000-token prompt through the whole server
def test_long_prompt_without_max_tokens_gets_the_room_left(client):
    # the server's default budget (512) does not fit beside a ~1000-token prompt in the demo's 1024
    # positions: with no max_tokens asked for it is cut to the room left, as OpenAI's servers do
    prompt = "reverse abc " + "x" * 990
    r = client.completions.create(model="illada-demo", prompt=prompt, extra_body={"diffusion": FAST})
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= 1024
    import openai

    with pytest.raises(openai.BadRequestError) as e:  # a budget the client asked for is refused, not cut
        client.completions.create(model="illada-demo", prompt=prompt, max_tokens=512)
    assert e.value.code == "context_length_exceeded" and "+ max_tokens (512)" in e.value.message


BAD = [
    ("POST", "/chat/completions", b"{not json", 400, "invalid_json"),
    (
        "POST",
        "/chat/completions",
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "foo": 1}),
        400,
        "unknown_field",
    ),
    ("POST", "/chat/completions", json.dumps({"messages": []}), 400, None),
    (
        "POST",
        "/chat/completions",
        json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
        400,
        None,
    ),
    (
        "POST",
        "/chat/completions",
        json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}),
        400,
        None,
    ),
    (
        "POST",
        "/chat/completions",
        json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": -1}),
        400,
        None,
    ),
    ("POST", "/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "stop": 5}), 400, None),
    (
        "POST",
        "/chat/completions",
        json.dumps({"messages": [{"role": "user", "content": "x"}], "diffusion": {"warp": 9}}),
        400,
        "unknown_field",
    ),
    (
        "POST",
        "/chat/completions",
        json.dumps({"messages": [{"role": "user", "content": "x" * 3000}]}),
        400,
        "context_length_exceeded",
    ),
    ("POST", "/completions", json.dumps({"prompt": ""}), 400, None),
    ("POST", "/chat/completions", b"[1, 2]", 400, "invalid_json"),
    ("POST", "/chat/completions", b"x" * (1 << 20 + 1), 413, "request_too_large"),
    ("GET", "/chat/completions", None, 405, None),
    ("GET", "/nothing", None, 404, "not_found"),
]


@pytest.mark.parametrize("method,path,body,status,code", BAD)
def test_bad_requests_get_openai_errors_and_server_survives(demo_server, method, path, body, status, code):
    with httpx.Client(base_url=demo_server.url, timeout=30) as h:
        r = h.request(method, path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["message"] and err["type"]
        if code:
            assert err["code"] == code
        assert h.get("/models").status_code == 200


def test_disconnecting_stream_frees_the_worker(ckpt_factory, caplog):
    """A random-weight model never says EOS: a long stream is cut off and the worker must move on; the
    disconnect logs no traceback."""
    import logging

    from fixtures import Spec

    caplog.set_level(logging.INFO)
    d, _ = ckpt_factory(Spec(seed=31))
    model, tok = load(str(d))
    srv = Server(model, tok, "tiny")
    try:
        body = {
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 480,
            "stream": True,
            "diffusion": {"block_length": 8, "steps_per_block": 8},
        }
        with httpx.Client(base_url=srv.url, timeout=30) as h:
            with h.stream("POST", "/chat/completions", json=body) as r:
                first = next(r.iter_lines())
                assert first.startswith("data: ")
            # the connection is closed here; the generation (60 blocks) must be cancelled
            t0 = time.time()
            while srv.engine.served < 1 and time.time() - t0 < 20:
                time.sleep(0.1)
            assert srv.engine.served == 1, (srv.engine.batch_sizes, srv.engine.waiting, srv.engine.jobs.qsize())
            small = dict(body, stream=False, max_tokens=8)
            assert h.post("/chat/completions", json=small).status_code == 200
        assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------ the OpenAI surface
USER = [{"role": "user", "content": "reverse abc"}]


def ask(client, messages=USER, **kw):
    kw.setdefault("max_tokens", 32)
    extra = kw.pop("extra_body", {"diffusion": FAST})
    return client.chat.completions.create(model="illada-demo", messages=messages, extra_body=extra, **kw)


def test_neutral_values_of_meaningless_fields_are_accepted(client, demo):
    r = ask(
        client,
        presence_penalty=0,
        frequency_penalty=0.0,
        logit_bias={},
        tools=[],
        tool_choice="none",
        response_format={"type": "text"},
        user="u1",
        top_p=1,
        n=1,
        logprobs=False,
        seed=3,
        store=False,
        metadata={"a": "b"},
        parallel_tool_calls=False,
        stream_options=None,
        temperature=0,
    )
    assert r.choices[0].message.content == direct(demo, "reverse abc")[0]


REFUSED = [
    ("presence_penalty", 0.5),
    ("frequency_penalty", -1),
    ("logit_bias", {"5": 10}),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]),
    ("response_format", {"type": "yaml"}),  # json_object and json_schema are answered (test_structured.py)
    ("tool_choice", "required"),
    ("n", 99),
    ("top_logprobs", 3),
    ("stream", "false"),
    ("top_k", -1),
    ("min_p", 2),
    ("top_p", 0),
    ("max_tokens", True),
    ("stop", [1]),
    ("diffusion", {"think_boost": "no"}),
    ("diffusion", {"mode": 1}),
    ("messages", [{"role": "tool", "content": "x"}]),
    ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
    ("messages", [{"role": "user", "content": "x", "tool_calls": [{"id": "1"}]}]),
    ("stream_options", {"include_usage": "yes"}),
    ("model", 5),
    ("warp", 9),
]


@pytest.mark.parametrize("name,value", REFUSED)
def test_unsupported_values_are_refused_naming_the_field(demo_server, name, value):
    body = {"model": "illada-demo", "messages": USER, "max_tokens": 8, name: value}
    with httpx.Client(base_url=demo_server.url, timeout=30) as h:
        r = h.post("/chat/completions", json=body)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"].startswith(name) and name in err["message"], err
    assert "\n" not in err["message"]


@pytest.mark.parametrize(
    "name,value",
    [
        ("presence_penalty", 0.5),
        ("frequency_penalty", 1.0),
        ("logit_bias", {"5": 10}),
        ("response_format", {"type": "yaml"}),
        ("tools", REFUSED[3][1]),
        ("tool_choice", "required"),
        ("top_logprobs", 2),
    ],
)
def test_the_openai_client_sees_the_refused_field(client, name, value):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        ask(client, **{name: value})
    assert e.value.param == name and name in e.value.message


def test_content_parts_and_developer_role(client, demo):
    model, tok = demo
    parts = [{"type": "text", "text": "reverse"}, {"type": "text", "text": "abc"}]
    r = ask(client, messages=[{"role": "developer", "content": "be brief"}, {"role": "user", "content": parts}])
    want = direct_msgs(demo, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "reverse\nabc"}])
    assert r.choices[0].message.content == want


def direct_msgs(demo, msgs, **kw):
    model, tok = demo
    return generate_text(model, tok, msgs, **{"mode": "fast", "max_tokens": 32, **kw})


def test_a_conversation_without_a_user_turn_is_a_400(client):
    import openai

    for msgs in (
        [{"role": "system", "content": "reverse abc"}],
        [{"role": "developer", "content": "be brief"}, {"role": "assistant", "content": "ok"}],
    ):
        with pytest.raises(openai.BadRequestError) as e:
            ask(client, messages=msgs)
        assert e.value.status_code == 400 and "no user turn" in str(e.value)


def test_stream_include_usage_sends_a_usage_chunk(client, demo):
    text, tokens, _ = direct(demo, "reverse abc")
    chunks = list(ask(client, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tokens)
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == text


def test_n_choices_are_rows_of_one_batch(client, demo, demo_server):
    before = len(demo_server.engine.batch_sizes)
    r = ask(client, n=3)
    want = direct(demo, "reverse abc")[0]
    assert [c.index for c in r.choices] == [0, 1, 2] and all(c.message.content == want for c in r.choices)
    assert 3 in demo_server.engine.batch_sizes[before:]
    chunks = list(ask(client, n=2, stream=True))
    for i in range(2):
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i) == want


@pytest.mark.parametrize("sampler", [{"top_k": 1}, {"top_p": 0.01}, {"min_p": 1.0}])
def test_top_k_top_p_min_p_keep_only_the_argmax_at_their_extremes(client, demo, sampler):
    # each cuts the candidates to the most likely one, so sampling at T = 1 gives the greedy answer
    r = ask(client, temperature=1.0, seed=5, extra_body={"diffusion": FAST, **sampler})
    assert r.choices[0].message.content == direct(demo, "reverse abc")[0]


def test_sampling_without_a_cut_differs_from_greedy(client, demo):
    # a recall prompt: the demo is sure of a reversal even at T = 2, less so of which value a key has
    q = "a=1 b=2 ; a?"
    greedy = direct(demo, q)[0]
    outs = {
        ask(client, [{"role": "user", "content": q}], temperature=2.0, seed=s).choices[0].message.content
        for s in range(4)
    }
    assert outs != {greedy}


def test_logprobs_are_the_committed_tokens_at_their_step(client, demo):
    """The demo writes the answer in one forward: each token's log-probability is the log-softmax of that
    forward, which the model run directly on prompt + masks gives."""
    import mlx.core as mx

    from illada_mlx.engine import build_prompt

    model, tok = demo
    r = ask(client, logprobs=True, top_logprobs=2)
    assert r.diffusion_stats["nfe"] == 1
    content = r.choices[0].logprobs.content
    ids = build_prompt(tok, USER)
    x = mx.array([ids + [model.args.mask_token_id] * 32])
    lp = np.array(mx.log(mx.softmax(model(x).astype(mx.float32)[0, len(ids) :], axis=-1)))
    tokens = direct(demo, "reverse abc")[1]
    assert len(content) == len(tokens) == r.usage.completion_tokens
    for j, (e, t) in enumerate(zip(content, tokens)):
        assert abs(e.logprob - lp[j, t]) < 1e-3 and e.token == tok.decode([t])
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token


def test_logprobs_of_a_request_decoded_alone(client):
    # a fixed canvas shares no batch: the same log-probabilities come from the engine's own loop
    r = ask(client, logprobs=True, top_logprobs=1, extra_body={"diffusion": {"mode": "fast_fixed"}})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens > 0
    assert all(e.logprob <= 0 and e.top_logprobs[0].token == e.token for e in content)  # T = 0: the argmax


def test_completions_logprobs(client):
    r = client.completions.create(
        model="illada-demo",
        prompt="<|im_start|>user\nreverse abc<|im_end|>\n<|im_start|>assistant\n",
        max_tokens=32,
        logprobs=1,
        extra_body={"diffusion": FAST},
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.completion_tokens and all(
        v <= 0 for v in lp.token_logprobs
    )


def test_health_model_card_and_created(demo_server, client):
    with httpx.Client(base_url=demo_server.url.removesuffix("/v1"), timeout=10) as h:
        assert h.get("/health").json()["status"] == "ok"
    m = client.models.retrieve("illada-demo")
    assert m.id == "illada-demo" and abs(m.created - time.time()) < 3600
    import openai

    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_request_log_line(client, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="illada_mlx.server")
    r = ask(client)
    t0 = time.time()  # the line is written once the response has gone out
    while time.time() - t0 < 5:
        lines = [rec.getMessage() for rec in caplog.records if rec.name == "illada_mlx.server"]
        if any(m.startswith("POST /v1/chat/completions 200") for m in lines):
            break
        time.sleep(0.05)
    assert any(
        m.startswith("POST /v1/chat/completions 200 prompt=")
        and f"output={r.usage.completion_tokens} " in m
        and m.endswith(" ms")
        for m in lines
    ), lines


def test_bind_refuses_a_busy_port_in_one_line():
    from illada_mlx.config import IlladaError
    from illada_mlx.server import bind

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(IlladaError) as e:
            bind("127.0.0.1", s.getsockname()[1])
    assert "cannot listen on 127.0.0.1" in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------ hostile input
def raw_post(url, body: bytes, headers=None):
    with httpx.Client(base_url=url, timeout=30) as h:
        return h.post(
            "/chat/completions", content=body, headers={"content-type": "application/json", **(headers or {})}
        )


CRASHES = [
    b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
    b"[" * 100_000 + b"]" * 100_000,
    b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"7" * 5000 + b"}",
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}',
    b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + b"1" * 5000 + b".5}",
    b'{"messages": [{"role": "user", "content": "hi"}], "user": "\xff\xfe"}',
    b'{"messages": [{"\\udfff": "user", "content": "hi"}]}',
    b'{"a": ' * 50 + b"1" + b"}" * 50,
]


@pytest.mark.parametrize("body", CRASHES, ids=range(len(CRASHES)))
def test_crash_inputs_get_a_400(demo_server, body):
    r = raw_post(demo_server.url, body)
    assert r.status_code == 400, r.text
    assert "\n" not in r.json()["error"]["message"]


def test_a_prompt_too_long_in_characters_is_refused_before_tokenizing(demo_server):
    with httpx.Client(base_url=demo_server.url, timeout=30) as h:
        r = h.post("/chat/completions", json={"messages": [{"role": "user", "content": "x" * 500_000}]})
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded" and "characters" in err["message"]


def test_fuzz_gets_no_500_and_the_server_still_answers(demo_server, client, demo):
    rng = np.random.default_rng(0)
    base = {"model": "illada-demo", "messages": USER, "max_tokens": 8, "diffusion": {"mode": "fast"}}
    names = sorted(
        set(base)
        | {
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "n",
            "stop",
            "seed",
            "stream",
            "logprobs",
            "top_logprobs",
            "presence_penalty",
            "logit_bias",
            "tools",
            "response_format",
            "stream_options",
            "prompt",
            "x",
        }
    )

    def value(depth=0):
        kind = rng.integers(0, 10 if depth < 3 else 6)
        return [
            lambda: None,
            lambda: True,
            lambda: int(rng.integers(-10, 10**6)),
            lambda: float(rng.normal() * 10.0 ** rng.integers(0, 30)),
            lambda: "".join(chr(int(c)) for c in rng.integers(1, 0x2FFF, rng.integers(0, 8))),
            lambda: "",
            lambda: [value(depth + 1) for _ in range(rng.integers(0, 3))],
            lambda: {str(rng.choice(names)): value(depth + 1) for _ in range(rng.integers(0, 3))},
            lambda: [{"role": enum(["user", "system", "developer", "assistant", "x"]), "content": value(depth + 1)}],
            lambda: {
                "mode": enum(["fast", "exact", "zz"]),
                "cache": enum(["token", "none"]),
                "block_refresh": enum(["window", "full"]),
                "block_length": int(rng.integers(-2, 40)),
            },
        ][kind]()

    def enum(names):  # an enumerated field: one of its names, or a value of another JSON type
        return [str(rng.choice(names)), [str(rng.choice(names))], {"a": 1}, 1, 2.5, True, None][rng.integers(0, 7)]

    statuses, t0 = {}, time.time()
    with httpx.Client(base_url=demo_server.url, timeout=60) as h:
        for i in range(300):
            if time.time() - t0 > 90:
                break
            body = dict(base)
            for _ in range(rng.integers(1, 4)):
                body[str(rng.choice(names))] = value()
            if rng.random() < 0.2:  # the enumerated fields, each a name or a value of another JSON type
                body["messages"] = [{"role": enum(["user", "system", "developer", "assistant"]), "content": "hi"}]
            if rng.random() < 0.2:
                body["diffusion"] = {
                    k: enum(v)
                    for k, v in (("mode", ["fast"]), ("cache", ["token"]), ("block_refresh", ["window"]))
                    if rng.random() < 0.5
                }
            if rng.random() < 0.1:
                body = value()
            path = "/chat/completions" if rng.random() < 0.8 else "/completions"
            r = h.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (body, r.text)
    assert sum(statuses.values()) >= 100 and statuses.get(400, 0) > 0 and statuses.get(200, 0) > 0, statuses
    assert ask(client).choices[0].message.content == direct(demo, "reverse abc")[0]


# ------------------------------------------------------------------------------------------ bounded resources
@pytest.fixture(scope="module")
def tiny_model(ckpt_factory):
    from fixtures import Spec

    d, _ = ckpt_factory(Spec(seed=31))
    return load(str(d))


@pytest.fixture(scope="module")
def short_server(tiny_model):
    s = Server(*tiny_model, "tiny", idle_seconds=1.0, max_request_seconds=1.0, opts=Options(body_seconds=1.0))
    yield s
    s.stop()


def _rss_mb():
    import resource

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


def _status(sock) -> bytes:
    sock.settimeout(10)
    return sock.recv(4096).split(b"\r\n")[0]


def test_a_body_over_the_limit_is_refused_without_being_read(demo_server):
    with socket.create_connection(("127.0.0.1", demo_server.port)) as s:  # Content-Length first
        s.sendall(HEAD + b"Content-Length: 1000000000\r\n\r\n")
        assert b" 413 " in _status(s)
    rss = _rss_mb()
    with socket.create_connection(("127.0.0.1", demo_server.port)) as s:  # then the stream as it comes in
        s.sendall(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % (1 << 16) + b" " * (1 << 16) + b"\r\n"
        s.settimeout(3)
        sent = 0
        while sent < 256 << 20:  # 256 MB at most; the server stops reading after 1 MB
            try:
                s.sendall(chunk)
            except OSError:  # the server closed it, or stopped reading and the buffers are full
                break
            sent += len(chunk)
        assert sent < 32 << 20
        assert b" 413 " in _status(s)
    assert _rss_mb() - rss < 32


def _closed_within(sock, seconds) -> bool:
    import select

    t0 = time.time()
    while time.time() - t0 < seconds:
        if select.select([sock], [], [], 0.1)[0]:
            try:
                return sock.recv(4096) == b"" or True
            except OSError:
                return True
    return False


def test_idle_and_slow_connections_are_closed(short_server):
    with socket.create_connection(("127.0.0.1", short_server.port)) as idle:
        assert _closed_within(idle, 5)
    with socket.create_connection(("127.0.0.1", short_server.port)) as slow:
        slow.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        t0 = time.time()
        closed = False
        while not closed and time.time() - t0 < 5:  # one header byte every 0.2 s never finishes the headers
            try:
                slow.sendall(b"x")
            except OSError:
                closed = True
            closed = closed or _closed_within(slow, 0.2)
        assert closed and time.time() - t0 < 4


def test_a_slow_body_gets_408(short_server):
    with socket.create_connection(("127.0.0.1", short_server.port)) as s:
        s.sendall(HEAD + b"Content-Length: 100\r\n\r\n{")
        t0 = time.time()
        assert b" 408 " in _status(s) and time.time() - t0 < 5


def test_many_idle_sockets_do_not_stop_health(tiny_model):
    srv = Server(*tiny_model, "tiny", idle_seconds=30.0, max_connections=40)
    socks = []
    try:
        for _ in range(150):  # bounded, loopback only
            socks.append(socket.create_connection(("127.0.0.1", srv.port)))
        time.sleep(0.2)
        t0 = time.time()
        with httpx.Client(base_url=f"http://127.0.0.1:{srv.port}", timeout=5) as h:
            assert h.get("/health").status_code == 200
        assert time.time() - t0 < 3  # the oldest idle ones made room, not the 30 s timeout
    finally:
        for s in socks:
            s.close()
        srv.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_over_max_request_seconds_ends_with_time_limit(short_server, stream):
    body = {
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 480,
        "stream": stream,
        "diffusion": {"block_length": 8, "steps_per_block": 8, "mode": "variable"},
    }
    t0 = time.time()
    with httpx.Client(base_url=short_server.url, timeout=60) as h:
        r = h.post("/chat/completions", json=body)
    if stream:
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        reason = events[-1]["choices"][0]["finish_reason"]
    else:
        reason = r.json()["choices"][0]["finish_reason"]
    assert reason == "time_limit" and time.time() - t0 < 15


# ------------------------------------------------------------------------------------------ exposure
@pytest.fixture(scope="module")
def locked(demo):
    s = Server(
        *demo,
        "illada-demo",
        opts=Options(
            api_key="sekrit", allowed_hosts=("127.0.0.1", "localhost"), allowed_origins=("http://ok.example",)
        ),
    )
    yield s
    s.stop()


def test_api_key_is_required(locked, demo):
    import openai

    bad = openai.OpenAI(base_url=locked.url, api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        ask(bad)
    good = openai.OpenAI(base_url=locked.url, api_key="sekrit", max_retries=0, timeout=60)
    assert ask(good).choices[0].message.content == direct(demo, "reverse abc")[0]
    with httpx.Client(base_url=f"http://127.0.0.1:{locked.port}", timeout=10) as h:
        assert h.get("/v1/models").status_code == 401 and h.get("/health").status_code == 200


def test_text_plain_post_gets_415_and_a_foreign_host_400(locked):
    auth = {"authorization": "Bearer sekrit"}
    body = json.dumps({"messages": USER, "max_tokens": 8})
    with httpx.Client(base_url=locked.url, timeout=30) as h:
        r = h.post("/chat/completions", content=body, headers={**auth, "content-type": "text/plain"})
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
        r = h.post(
            "/chat/completions",
            content=body,
            headers={**auth, "content-type": "application/json", "host": "evil.example:8080"},
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"
        assert h.get("/models", headers={**auth, "host": "localhost:1234"}).status_code == 200


def test_cors_is_off_unless_origins_are_allowed(locked, demo_server):
    pre = {
        "origin": "http://ok.example",
        "access-control-request-method": "POST",
        "access-control-request-headers": "content-type",
    }
    with httpx.Client(timeout=10) as h:
        r = h.options(f"{locked.url}/chat/completions", headers=pre)
        assert r.headers.get("access-control-allow-origin") == "http://ok.example"
        r = h.options(f"{locked.url}/chat/completions", headers={**pre, "origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        r = h.options(f"{demo_server.url}/chat/completions", headers=pre)
        assert "access-control-allow-origin" not in r.headers


def test_binding_beyond_loopback_without_a_key_warns():
    from illada_mlx.server import exposure

    assert exposure("0.0.0.0", Options()) and not exposure("0.0.0.0", Options(api_key="k"))
    opts = Options()
    assert exposure("127.0.0.1", opts) == [] and "localhost" in opts.allowed_hosts


@pytest.mark.slow  # concurrent requests through the whole server
def test_compatible_concurrent_requests_share_a_batch(demo_server, client, demo):
    before = len(demo_server.engine.batch_sizes)
    test_concurrent_requests_all_complete_correctly(client, demo)
    assert max(demo_server.engine.batch_sizes[before:]) > 1


def test_the_default_budget_of_a_fixed_canvas_is_the_official_128(demo_server):
    from illada_mlx.api import settings

    e = demo_server.engine
    s = settings(e.model.args, {"diffusion": {"mode": "exact"}})
    from illada_mlx.spec import make_spec

    spec = make_spec(e.model, e.tok, 30, **s)
    assert spec.max_tokens == 128 and spec.n_blocks * spec.steps_per_block == 128  # forwards, not 512


def test_a_full_queue_answers_429(tiny_model):
    srv = Server(*tiny_model, "tiny", max_queue=1, max_batch=1)
    long = {
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 480,
        "stream": True,
        "diffusion": {"block_length": 8, "steps_per_block": 8},
    }
    short = dict(long, stream=False, max_tokens=8)
    ex = ThreadPoolExecutor(1)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as h, httpx.Client(base_url=srv.url, timeout=60) as h2:
            with h.stream("POST", "/chat/completions", json=long) as r:
                lines = r.iter_lines()  # kept: a dropped line iterator closes the response
                next(lines)  # running: the batch is full (max_batch 1)
                queued = ex.submit(h2.post, "/chat/completions", json=short)
                t0 = time.time()
                while srv.engine.queue_length() < 1 and time.time() - t0 < 20:
                    time.sleep(0.05)
                with httpx.Client(base_url=srv.url, timeout=60) as h3:
                    busy = h3.post("/chat/completions", json=short)
                assert busy.status_code == 429 and busy.json()["error"]["code"] == "queue_full"
            assert queued.result().status_code == 200  # the stream closed: its rows left, the queued one ran
    finally:
        ex.shutdown()
        srv.stop()


def test_a_queued_request_whose_client_left_does_not_hold_a_queue_place(tiny_model):
    # max_queue 1: a queued stream whose client closed leaves its place to the next request at once, though
    # the worker (mid-block in a long decode) has not come to it yet
    srv = Server(*tiny_model, "tiny", max_queue=1, max_batch=1)
    long = {
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 480,
        "stream": True,
        "diffusion": {"block_length": 240, "steps_per_block": 240},
    }
    short = dict(long, stream=False, max_tokens=8, diffusion={"block_length": 8, "steps_per_block": 8})
    ex = ThreadPoolExecutor(1)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as h, httpx.Client(base_url=srv.url, timeout=60) as h2:
            with h.stream("POST", "/chat/completions", json=long) as r:
                lines = r.iter_lines()  # kept: a dropped line iterator closes the response
                next(lines)
                t0 = time.time()
                while not srv.engine.batch_sizes and time.time() - t0 < 10:
                    time.sleep(0.01)  # running: the batch is full (max_batch 1)
                with h2.stream("POST", "/chat/completions", json=long) as q:
                    kept = q.iter_lines()
                    next(kept)  # queued (its role chunk comes at once)
                    assert q.status_code == 200 and srv.engine.queue_length() == 1
                while srv.engine.queue_length() and time.time() - t0 < 10:
                    time.sleep(0.002)  # the server has seen its client go
                blocks = len(srv.engine.batch_sizes)
                third = ex.submit(h2.post, "/chat/completions", json=short)
                while srv.engine.queue_length() < 1 and not third.done() and time.time() - t0 < 20:
                    time.sleep(0.01)
                assert len(srv.engine.batch_sizes) == blocks  # still the long decode's block: nothing taken
            assert third.result().status_code == 200  # queued, not refused; it ran once the long one went
    finally:
        ex.shutdown()
        srv.stop()


def test_a_client_gone_mid_body_is_one_line(demo_server, caplog):
    import logging

    caplog.set_level(logging.INFO)
    with socket.create_connection(("127.0.0.1", demo_server.port)) as s:
        s.sendall(HEAD + b'Content-Length: 1000\r\n\r\n{"messages": ')
    time.sleep(1.0)
    with httpx.Client(base_url=demo_server.url, timeout=10) as h:
        assert h.get("/models").status_code == 200
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]


# ------------------------------------------------------------------------------------------ enumerated fields
WRONG_TYPES = [["user"], {"a": 1}, 1, 1.5, True, "zz"]  # JSON types an enumerated field must not take
ENUMERATED = {  # where the field sits in a request that is otherwise valid -> the body with that value
    "messages[0].role": lambda v: {"messages": [{"role": v, "content": "hi"}]},
    "messages[0].content[0].type": lambda v: {"messages": [{"role": "user", "content": [{"type": v, "text": "x"}]}]},
    "diffusion.mode": lambda v: {"messages": USER, "diffusion": {"mode": v}},
    "diffusion.cache": lambda v: {"messages": USER, "diffusion": {"cache": v}},
    "diffusion.block_refresh": lambda v: {"messages": USER, "diffusion": {"block_refresh": v}},
    "tool_choice": lambda v: {"messages": USER, "tool_choice": v},
    "function_call": lambda v: {"messages": USER, "function_call": v},
    "response_format.type": lambda v: {"messages": USER, "response_format": {"type": v}},
    "modalities[0]": lambda v: {"messages": USER, "modalities": [v]},
}


@pytest.mark.parametrize("where", ENUMERATED)
def test_enumerated_fields_of_a_wrong_json_type_get_a_400(demo_server, where):
    with httpx.Client(base_url=demo_server.url, timeout=30) as h:
        for v in WRONG_TYPES:
            body = {"max_tokens": 8, **ENUMERATED[where](v)}
            r = h.post("/chat/completions", json=body)
            assert r.status_code == 400, (where, v, r.text)
            assert "\n" not in r.json()["error"]["message"]


def test_a_refusal_is_logged_with_its_reason(demo_server, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="illada_mlx.server")
    with httpx.Client(base_url=demo_server.url, timeout=30) as h:
        r = h.post("/chat/completions", json={"messages": [{"role": ["user"], "content": "hi"}]})
    want = f"{r.json()['error']['message']} ({r.json()['error']['param']})"
    t0 = time.time()
    while time.time() - t0 < 5:
        lines = [rec.getMessage() for rec in caplog.records if rec.name == "illada_mlx.server"]
        if any(m.startswith("POST /v1/chat/completions 400") for m in lines):
            break
        time.sleep(0.05)
    assert any(m.startswith("POST /v1/chat/completions 400") and m.endswith(want) for m in lines), lines


@pytest.mark.parametrize("host", ["localhost:abc", "localhost:", "localhost:99999", "[::1]x", "127.0.0.1:-1"])
def test_a_host_header_with_a_malformed_port_is_refused(demo_server, host):
    with httpx.Client(base_url=demo_server.url, timeout=10) as h:
        r = h.get("/models", headers={"host": host})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host", r.text
        assert h.get("/models", headers={"host": "localhost:8080"}).status_code == 200


def test_allowed_hosts_star_means_any_and_a_list_of_nothing_is_refused():
    from illada_mlx.config import IlladaError
    from illada_mlx.listen import Guard, host_names

    assert host_names("*") == ("*",) and host_names("a.example, B.example") == ("a.example", "b.example")
    for empty in (",,,", "", " , "):
        with pytest.raises(IlladaError, match="names no host"):
            host_names(empty)
    guard = Guard(None, Options(allowed_hosts=host_names("*")))
    scope = {"headers": [(b"host", b"evil.example:80")], "method": "GET", "path": "/health"}
    assert guard._refuse(scope) is None
    guard = Guard(None, Options(allowed_hosts=host_names("ok.example")))
    assert guard._refuse(scope).code == "invalid_host"


@pytest.mark.parametrize(
    "key,env", [("", None), (None, ""), ("has space", None), ("line\nbreak", None), ("clé", None), ("tab\t", None)]
)
def test_serve_refuses_an_api_key_no_client_can_send(key, env, monkeypatch):
    from click.testing import CliRunner

    from illada_mlx.cli import main

    monkeypatch.delenv("ILLADA_MLX_API_KEY", raising=False)
    if env is not None:
        monkeypatch.setenv("ILLADA_MLX_API_KEY", env)
    r = CliRunner().invoke(
        main, ["serve", "--port", str(_free_port())] + (["--api-key", key] if key is not None else [])
    )
    assert r.exit_code == 1 and r.output.startswith("error: --api-key") and r.output.count("\n") == 1, r.output


def test_a_malformed_chunked_body_is_one_log_line(demo_server, caplog):
    import logging

    caplog.set_level(logging.INFO)
    uv = logging.getLogger("uvicorn.error")
    uv.addHandler(caplog.handler)  # uvicorn's loggers do not reach the root logger
    level, uv.level = uv.level, logging.INFO
    try:
        with socket.create_connection(("127.0.0.1", demo_server.port)) as s:
            s.sendall(HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n")
            time.sleep(0.2)  # the app is reading the body when the bad chunk comes
            s.sendall(b"zz\r\nabc\r\n0\r\n\r\n")
            assert _status(s) == b"HTTP/1.1 400 Bad Request"
        t0 = time.time()
        while time.time() - t0 < 5 and not any("malformed" in r.getMessage() for r in caplog.records):
            time.sleep(0.05)
    finally:
        uv.removeHandler(caplog.handler)
        uv.level = level
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(lines) == 1 and lines[0].startswith("POST /v1/chat/completions 400") and "malformed" in lines[0], lines
    assert not any(r.exc_info for r in caplog.records)


def _counting(model) -> list:
    """Count the model's forwards (a list that grows by one per call)."""
    calls, base = [], type(model)

    def call(self, *a, **kw):
        calls.append(1)
        return base.__call__(self, *a, **kw)

    model.__class__ = type("Counting" + base.__name__, (base,), {"__call__": call})
    return calls


@pytest.mark.parametrize("mode,stream", [("variable", True), ("exact", True), ("variable", False)])
def test_a_request_whose_client_left_stops_within_a_step(ckpt_factory, mode, stream):
    # one block of 256 steps: a client gone after its first step must not cost the other 255 forwards,
    # batched (variable) or decoded alone (exact)
    from fixtures import Spec

    d, _ = ckpt_factory(Spec(seed=31))
    model, tok = load(str(d))
    calls = _counting(model)
    srv = Server(model, tok, "tiny")
    try:
        body = {
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 256,
            "stream": stream,
            "diffusion": {"mode": mode, "block_length": 256, "steps_per_block": 256},
        }
        with httpx.Client(base_url=srv.url, timeout=30) as h:
            if stream:
                with h.stream("POST", "/chat/completions", json=body) as r:
                    lines = r.iter_lines()  # held: a dropped iterator closes the response
                    next(lines)
                    t0 = time.time()
                    while len(calls) < 2 and time.time() - t0 < 10:
                        time.sleep(0.01)
                    assert len(calls) >= 2, "no forward ran"
            else:
                with pytest.raises(httpx.ReadTimeout):
                    h.post("/chat/completions", json=body, timeout=0.3)
        t0 = time.time()
        while srv.engine.served < 1 and time.time() - t0 < 30:
            time.sleep(0.02)
        gone = len(calls)
        assert srv.engine.served == 1 and gone < 64, gone  # not the block's 256 (non-streamed: polled every 0.5 s)
        time.sleep(0.3)
        assert len(calls) == gone  # nothing more runs
    finally:
        srv.stop()


@pytest.mark.slow  # an exact-mode request through the whole server
def test_diffusion_stats_say_only_what_was_measured(demo_server):
    # a batched reply (fast) and one decoded alone (exact): no figure is a zero or 1/0 standing for "unknown"
    with httpx.Client(base_url=demo_server.url, timeout=60) as h:
        batched = h.post("/chat/completions", json={"messages": USER, "diffusion": FAST}).json()["diffusion_stats"]
        alone = h.post(
            "/chat/completions", json={"messages": USER, "diffusion": {"mode": "exact"}, "max_tokens": 32}
        ).json()["diffusion_stats"]
    for st in (batched, alone):
        assert st["nfe"] > 0 and st["output_tokens"] > 0 and 0 < st["peak_memory_bytes"] < 2**40
        assert st["prompt_tps"] is None or 0 < st["prompt_tps"] < 1e8
    assert batched["prompt_tps"] is None and batched["processed"] is None and batched["prompt_s"] is None
    assert alone["processed"] > 0 and alone["prompt_s"] > 0


@pytest.mark.parametrize("stream", [False, True])
def test_completions_text_offset_points_at_each_token(demo_server, stream):
    prompt = "<|im_start|>user\nreverse abcdef<|im_end|>\n<|im_start|>assistant\n"
    body = {
        "prompt": prompt,
        "max_tokens": 64,
        "logprobs": 0,
        "stream": stream,
        "n": 2,
        "diffusion": {"mode": "fast", "block_length": 4},
    }
    with httpx.Client(base_url=demo_server.url, timeout=60) as h:
        r = h.post("/completions", json=body)
    texts, toks, offs = {}, {}, {}
    chunks = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")] if stream else [r.json()]
    for c in chunks:
        for ch in c["choices"]:
            i = ch["index"]
            texts[i] = texts.get(i, "") + ch["text"]
            if ch["logprobs"]:
                toks.setdefault(i, []).extend(ch["logprobs"]["tokens"])
                offs.setdefault(i, []).extend(ch["logprobs"]["text_offset"])
    assert sorted(texts) == [0, 1] and all(len(toks[i]) > 1 for i in texts)
    for i, text in texts.items():
        assert len(offs[i]) == len(toks[i]) and offs[i][0] == 0
        for t, o in zip(toks[i], offs[i]):
            assert text[o : o + len(t)] == t, (text, t, o)


def test_completions_decode_the_prompt_as_it_is_as_the_readme_says(demo_server, client):
    # docs/server.md: the demo model answers a raw prompt with nothing, its template with the chat answer
    raw = client.completions.create(model="illada-demo", prompt="57+68=", max_tokens=64)
    templated = client.completions.create(
        model="illada-demo", max_tokens=64, prompt="<|im_start|>user\n57+68=<|im_end|>\n<|im_start|>assistant\n"
    )
    chat = ask(client, [{"role": "user", "content": "57+68="}], max_tokens=64, extra_body={})
    assert raw.choices[0].text == "" and raw.choices[0].finish_reason == "stop"
    assert templated.choices[0].text == chat.choices[0].message.content == "125"


def test_a_burst_at_the_open_file_limit_is_one_log_line(caplog):
    import errno
    import logging

    from illada_mlx.listen import LoopErrors

    caplog.set_level(logging.INFO)
    handler, loop = LoopErrors(quiet_seconds=60), None

    class Loop:  # what the handler uses of the loop: its default handler, for anything else
        seen = []

        def default_exception_handler(self, context):
            self.seen.append(context["message"])

    loop = Loop()
    full = OSError(errno.EMFILE, "Too many open files")
    for _ in range(1858):  # the issue's burst: one refused accept() each
        handler(loop, {"message": "socket.accept() out of system resource", "exception": full})
    handler(loop, {"message": "something else"})
    lines = [r for r in caplog.records if r.name == "illada_mlx.server"]
    assert len(lines) == 1 and "open-file limit (Too many open files)" in lines[0].getMessage()
    assert not lines[0].exc_info and handler.count == 1858 and loop.seen == ["something else"]


def test_serve_raises_the_open_file_limit_for_a_burst():
    import resource

    from illada_mlx.listen import raise_fd_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))  # macOS's default
        got = raise_fd_limit(256)
        assert got == resource.getrlimit(resource.RLIMIT_NOFILE)[0] == min(8 * 256 + 1024, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_gone_client_leaves_a_shared_batch_within_a_step(ckpt_factory):
    # two streamed requests share a batch; the second's client leaves mid-block: its row goes at the next
    # step (not the block's 128), and the first's reply is the one it gets decoded without the server
    from fixtures import Spec

    d, _ = ckpt_factory(Spec(seed=31))
    model, tok = load(str(d))
    rows, base = [], type(model)

    def call(self, *a, **kw):
        rows.append(a[0].shape[0])  # the rows of this forward
        return base.__call__(self, *a, **kw)

    model.__class__ = type("Rows" + base.__name__, (base,), {"__call__": call})
    srv = Server(model, tok, "tiny")
    settings = {"mode": "variable", "block_length": 128, "steps_per_block": 128}
    stay = [{"role": "user", "content": "stay"}]
    body = {"max_tokens": 256, "stream": True, "diffusion": settings}
    try:
        with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=srv.url, timeout=60) as h:

            def read(messages):
                text = ""
                with h.stream("POST", "/chat/completions", json={**body, "messages": messages}) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                return text

            first = pool.submit(read, stay)
            while not rows:
                time.sleep(0.005)
            with httpx.Client(base_url=srv.url, timeout=60) as h2:
                with h2.stream(
                    "POST", "/chat/completions", json={**body, "messages": [{"role": "user", "content": "go"}]}
                ) as r:
                    lines = r.iter_lines()  # held: a dropped iterator closes the response
                    next(lines)
                    t0 = time.time()
                    while 2 not in rows and time.time() - t0 < 30:
                        time.sleep(0.002)
                    assert 2 in rows, "the second request never joined the first's batch"
                    shared = rows.count(2)
            text = first.result(timeout=60)
        t0 = time.time()
        while srv.engine.served < 2 and time.time() - t0 < 30:
            time.sleep(0.02)
        after = rows.count(2) - shared
        assert srv.engine.served == 2 and srv.engine.cancelled == 1
        assert srv.engine.late_steps == [0]  # no step began after its client had gone
        assert after < 64, after  # the row left at a step, not at its block's end (128 steps)
        assert text == reply(model, tok, stay, max_tokens=256, **settings)[0]
    finally:
        srv.stop()


def test_a_job_takes_only_typed_events_and_a_reader_refuses_unknown_ones():
    # the old channel read any mistyped kind as "done"; now an unknown event cannot be sent, nor read
    import asyncio

    from illada_mlx.server import Failed, Finished, Job, Stepped, Text
    from illada_mlx.server.openai_wire import Answer

    loop = asyncio.new_event_loop()
    try:
        job = Job([1, 2], None, loop, asyncio.Queue())
        with pytest.raises(TypeError, match="unknown server event"):
            job.emit(("done", 0, {}))
        other = Job([1, 2], None, loop, asyncio.Queue())
        for ev in (Text(0, "hi"), Stepped(0, 0, 0, 0, 8, []), Finished(0, "stop", 1, None, {}), Failed(0, "x")):
            other.emit(ev)  # accepted
        job.emit(Text(0, "hi"))

        class Request:
            state = type("State", (), {})()

        async def read():
            job.out.put_nowait("text")  # not an event
            return [c async for c in Answer(True, "m", 2, False).events(job, Request())]

        with pytest.raises(TypeError, match="unknown server event"):
            loop.run_until_complete(read())
    finally:
        loop.close()
