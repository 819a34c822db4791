"""The web chat page (GET /) and the step-event stream it draws (`diffusion.steps`): the served files, the
stream replayed into the final text with the official `openai` client, and the page itself in headless
Chromium (Debian's `chromium`, driven by Playwright) against a server on the bundled demo model."""

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from illada_mlx.server import Options
from illada_mlx.spec import make_spec
from test_server import Server

CHROMIUM = Path("/usr/bin/chromium")
OUT = Path(__file__).parent / "out"  # the browser test's screenshot (gitignored)


@pytest.fixture(scope="module")
def web_server(demo):
    s = Server(*demo, "illada-demo")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(web_server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=web_server.url, api_key="none", max_retries=0, timeout=120)


def raw_get(port: int, path: str) -> tuple[int, bytes]:
    """(status, body) of a GET sent byte for byte (no client normalizes the path)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


# ------------------------------------------------------------------------------------------ the files
def test_the_page_and_its_files_are_served_with_their_types(web_server):
    with httpx.Client(base_url=f"http://127.0.0.1:{web_server.port}", timeout=10) as h:
        page = h.get("/")
        assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
        assert '<script src="/static/app.js">' in page.text and "/static/style.css" in page.text
        assert "http" not in page.text.replace("http-equiv", "")  # nothing from elsewhere: it works offline
        for name, ctype in (("app.js", "text/javascript; charset=utf-8"), ("style.css", "text/css; charset=utf-8")):
            r = h.get(f"/static/{name}")
            assert r.status_code == 200 and r.headers["content-type"] == ctype and r.text
            assert r.headers["x-content-type-options"] == "nosniff"
        assert page.headers["content-security-policy"].startswith("default-src 'self'")


@pytest.mark.parametrize("path", ["/static/../server.py", "/static/..%2Fserver.py", "/static/%2e%2e/server.py",
                                  "/static/index.html", "/static/", "/static/APP.JS",
                                  "/static/web/app.js", "/web/app.js", "/index.html", "/static/..%5Cserver.py"])
def test_only_the_listed_files_are_served(web_server, path):
    status, body = raw_get(web_server.port, path)
    assert status in (400, 404) and b"import" not in body, (path, status, body[:200])


def test_the_page_is_public_but_the_api_keeps_its_key(demo):
    s = Server(*demo, "illada-demo", opts=Options(api_key="sekrit", allowed_hosts=("127.0.0.1",)))
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{s.port}", timeout=10) as h:
            assert h.get("/").status_code == 200 and h.get("/static/app.js").status_code == 200
            assert h.get("/static/nope.js").status_code == 404
            assert h.get("/v1/illada/defaults").status_code == 401
            assert h.post("/", json={}).status_code == 401  # only GET is public
            assert h.get("/v1/illada/defaults", headers={"authorization": "Bearer sekrit"}).status_code == 200
            assert h.get("/", headers={"host": "evil.example"}).status_code == 400  # the Host check still holds
    finally:
        s.stop()


def test_defaults_are_the_model_defaults_per_mode(web_server, demo):
    model, tok = demo
    with httpx.Client(base_url=web_server.url, timeout=10) as h:
        d = h.get("/illada/defaults").json()
    assert d["model"] == "illada-demo" and d["mode"] == make_spec(model, tok, 0).mode
    exact, fast = d["modes"]["exact"], d["modes"]["fast"]
    assert exact["max_tokens"] == 128 and exact["rule"] == "schedule" and fast["rule"] == "threshold"
    assert fast["block_length"] == make_spec(model, tok, 0, mode="fast").block_length


# ------------------------------------------------------------------------------------------ the step events
@pytest.mark.parametrize("diffusion,stream,message", [
    ({"steps": "yes"}, True, "diffusion.steps must be true or false"),
    ({"steps": 1}, True, "diffusion.steps must be true or false"),
    ({"steps": True}, False, "diffusion.steps needs stream: true"),
])
def test_steps_option_is_checked(web_server, diffusion, stream, message):
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": stream, "diffusion": diffusion}
    with httpx.Client(base_url=web_server.url, timeout=30) as h:
        for path, b in (("/chat/completions", body), ("/completions", {**body, "prompt": "hi", "messages": None})):
            r = h.post(path, json={k: v for k, v in b.items() if v is not None})
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == "diffusion.steps" and err["message"].startswith(message)


def replay(chunks, tok, spec, chat=True):
    """Per choice: (the text its content chunks say, the text its step events replay to). The replay puts
    each commit on a canvas (checking it lands once, inside its block, with its token's text), then
    detokenizes the canvas cut at EOS/EoT as the server does."""
    canvases, texts = {}, {}
    for c in chunks:
        extra = c.model_extra or {}
        for ch in c.choices:
            texts.setdefault(ch.index, "")
            texts[ch.index] += (ch.delta.content or "") if chat else (ch.text or "")
        if "diffusion" in extra:
            assert len(c.choices) == 1 and not (c.choices[0].delta.content if chat else c.choices[0].text)
            ev, canvas = extra["diffusion"], canvases.setdefault(c.choices[0].index, {})
            for pos, t, piece in ev["commits"]:
                assert ev["start"] <= pos < ev["start"] + ev["length"] and pos not in canvas
                assert piece == tok.decode([t])
                canvas[pos] = t
    out = {}
    for i, canvas in canvases.items():
        assert sorted(canvas) == list(range(len(canvas)))  # every position of every block run, committed
        ids, _ = spec.cut_at_stop([canvas[p] for p in range(len(canvas))])
        out[i] = (texts[i], tok.decode(ids))
    return out


@pytest.mark.parametrize("diffusion,n", [
    ({"mode": "variable", "block_length": 8, "steps_per_block": 4}, 1),  # batched, several blocks
    ({"mode": "fast", "block_length": 8}, 2),  # batched rows of one request, threshold commits
    ({"mode": "exact", "block_length": 8, "steps_per_block": 4}, 1),  # decoded alone, a fixed canvas past EOS
])
def test_step_events_replay_into_exactly_the_final_text(client, demo, diffusion, n):
    model, tok = demo
    prompts = ["reverse hello", "sort 3 1 2"]
    spec = make_spec(model, tok, 0)

    def ask(p):
        stream = client.chat.completions.create(model="illada-demo", messages=[{"role": "user", "content": p}],
                                                max_tokens=32, n=n, stream=True,
                                                extra_body={"diffusion": {**diffusion, "steps": True}})
        return list(stream)

    with ThreadPoolExecutor(2) as ex:  # side by side: the batched path serves both
        results = list(ex.map(ask, prompts))
    for chunks in results:
        got = replay(chunks, tok, spec)
        assert sorted(got) == list(range(n))
        for said, replayed in got.values():
            assert said and replayed == said
        last = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        assert len(last) == n and last[0].model_extra["diffusion_stats"]["nfe"] >= 1
        assert last[0].model_extra["diffusion_settings"]["mode"] == diffusion["mode"]


def test_step_events_on_completions(client, demo):
    model, tok = demo
    prompt = "<|im_start|>user\nreverse abc<|im_end|>\n<|im_start|>assistant\n"
    chunks = list(client.completions.create(model="illada-demo", prompt=prompt, max_tokens=16, stream=True,
                                            extra_body={"diffusion": {"mode": "variable", "block_length": 8,
                                                                      "steps_per_block": 8, "steps": True}}))
    (said, replayed), = replay(chunks, tok, make_spec(model, tok, 0), chat=False).values()
    assert said and replayed == said


def test_ordinary_streams_carry_nothing_new(web_server):
    body = {"messages": [{"role": "user", "content": "reverse hello"}], "stream": True, "max_tokens": 16,
            "diffusion": {"mode": "variable", "block_length": 8, "steps_per_block": 8}}
    for steps in (None, False):
        if steps is not None:
            body["diffusion"]["steps"] = steps
        with httpx.Client(base_url=web_server.url, timeout=60) as h:
            lines = [x for x in h.post("/chat/completions", json=body).text.split("\n\n") if x]
        chunks = [json.loads(x[6:]) for x in lines[:-1]]
        assert lines[-1] == "data: [DONE]" and len(chunks) <= 2 + 2  # the role, a chunk per block, the end
        assert all(set(c) == {"id", "object", "created", "model", "choices"} for c in chunks)
