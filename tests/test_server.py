"""The OpenAI-compatible server on a free loopback port, driven by the official `openai` client."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from illada_mlx.load import load
from fixtures import reply
from illada_mlx.engine import generate_text
from illada_mlx.server import Engine, Options, make_app, make_server

FAST = {"mode": "fast"}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model, tok, name, max_queue=32, opts=None, max_batch=8, max_request_seconds=600.0, **kw):
        self.engine = Engine(model, tok, name, max_queue, max_batch, max_request_seconds)
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


@pytest.fixture(scope="module")
def demo_server(demo):
    s = Server(*demo, "illada-demo")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(demo_server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=demo_server.url, api_key="none", max_retries=0, timeout=120)


def test_models_endpoint(client):
    assert [m.id for m in client.models.list().data] == ["illada-demo"]


def direct(demo, text, mode="fast", max_tokens=32):
    """The same prompt decoded without the server (T = 0 is deterministic)."""
    model, tok = demo
    return reply(model, tok, [{"role": "user", "content": text}], mode=mode, max_tokens=max_tokens)


def test_chat_completion_non_streamed(client, demo):
    r = client.chat.completions.create(model="illada-demo", messages=[{"role": "user", "content": "reverse abc"}],
                                       max_tokens=32, extra_body={"diffusion": FAST})
    text, tokens, last = direct(demo, "reverse abc")
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == last.finish_reason and r.usage.completion_tokens == len(tokens)


def test_chat_completion_streamed_block_by_block(client, demo):
    stream = client.chat.completions.create(model="illada-demo", stream=True, max_tokens=64,
                                            messages=[{"role": "user", "content": "sort 3 1 2"}],
                                            extra_body={"diffusion": {"mode": "variable", "block_length": 8,
                                                                      "steps_per_block": 8}})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    model, tok = demo
    want, _, last = reply(model, tok, [{"role": "user", "content": "sort 3 1 2"}], mode="variable", max_tokens=64,
                          block_length=8, steps_per_block=8)
    assert text == want
    assert chunks[-1].choices[0].finish_reason == last.finish_reason
    assert chunks[0].choices[0].delta.role == "assistant" and not any(c.choices[0].delta.role for c in chunks[1:])
    assert len(chunks) - 2 <= last.stats.blocks  # the role, at most one text chunk per committed block, the end


def test_completions_endpoint_with_stop(client, demo):
    full = direct(demo, "reverse abc")[0]
    prompt = "<|im_start|>user\nreverse abc<|im_end|>\n<|im_start|>assistant\n"
    stop = full[1:2] or "x"
    r = client.completions.create(model="illada-demo", max_tokens=32, stop=[stop], prompt=prompt,
                                  extra_body={"diffusion": FAST})
    assert r.choices[0].text == (full[: full.find(stop)] if stop in full else full)


def test_concurrent_requests_all_complete_correctly(client, demo):
    model, tok = demo
    prompts = ["reverse abc", "reverse xyz", "sort 2 1", "a=4 b=8 ; b?"]
    expected = {p: generate_text(model, tok, [{"role": "user", "content": p}], mode="fast", max_tokens=32)
                for p in prompts}

    def ask(i):
        p = prompts[i % len(prompts)]
        r = client.chat.completions.create(model="illada-demo", max_tokens=32, extra_body={"diffusion": FAST},
                                           messages=[{"role": "user", "content": p}])
        return p, r.choices[0].message.content

    with ThreadPoolExecutor(20) as ex:
        results = list(ex.map(ask, range(20)))
    assert len(results) == 20
    assert all(text == expected[p] for p, text in results)


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
    ("POST", "/chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "foo": 1}), 400,
     "unknown_field"),
    ("POST", "/chat/completions", json.dumps({"messages": []}), 400, None),
    ("POST", "/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}), 400, None),
    ("POST", "/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}), 400, None),
    ("POST", "/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": -1}), 400, None),
    ("POST", "/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}], "stop": 5}), 400, None),
    ("POST", "/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x"}],
                                              "diffusion": {"warp": 9}}), 400, "unknown_field"),
    ("POST", "/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x" * 3000}]}), 400,
     "context_length_exceeded"),
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


def test_disconnecting_stream_frees_the_worker(ckpt_factory):
    """A random-weight model never says EOS: a long stream is cut off and the worker must move on."""
    from fixtures import Spec

    d, _ = ckpt_factory(Spec(seed=31))
    model, tok = load(str(d))
    srv = Server(model, tok, "tiny")
    try:
        body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 480, "stream": True,
                "diffusion": {"block_length": 8, "steps_per_block": 8}}
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
    finally:
        srv.stop()
