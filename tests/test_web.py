"""The web chat page (GET /) and the step-event stream it draws (`diffusion.steps`): the served files, the
stream replayed into the final text with the official `openai` client, and the page itself in headless
Chromium (Debian's `chromium`, driven by Playwright) against a server on the bundled demo model."""

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_server import Server

from illada_mlx.server import Options
from illada_mlx.spec import make_spec

CHROMIUM = Path("/usr/bin/chromium")
OUT = Path(__file__).parent / "out"  # the browser test's screenshot (gitignored)


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
def test_the_page_and_its_files_are_served_with_their_types(demo_server):
    with httpx.Client(base_url=f"http://127.0.0.1:{demo_server.port}", timeout=10) as h:
        page = h.get("/")
        assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
        assert '<script src="/static/app.js">' in page.text and "/static/style.css" in page.text
        assert "http" not in page.text.replace("http-equiv", "")  # nothing from elsewhere: it works offline
        for name, ctype in (("app.js", "text/javascript; charset=utf-8"), ("style.css", "text/css; charset=utf-8")):
            r = h.get(f"/static/{name}")
            assert r.status_code == 200 and r.headers["content-type"] == ctype and r.text
            assert r.headers["x-content-type-options"] == "nosniff"
        assert page.headers["content-security-policy"].startswith("default-src 'self'")


def test_the_page_has_an_icon_so_no_load_gets_a_404(demo):
    from xml.etree import ElementTree

    s = Server(*demo, "illada-demo", opts=Options(api_key="sekrit", allowed_hosts=("127.0.0.1",)))
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{s.port}", timeout=10) as h:
            assert '<link rel="icon" href="/favicon.ico"' in h.get("/").text
            r = h.get("/favicon.ico")  # public, as the page is: a browser sends no key for it
            assert r.status_code == 200 and r.headers["content-type"] == "image/svg+xml"
            assert ElementTree.fromstring(r.content).tag == "{http://www.w3.org/2000/svg}svg"
    finally:
        s.stop()


@pytest.mark.parametrize(
    "path",
    [
        "/static/../server.py",
        "/static/..%2Fserver.py",
        "/static/%2e%2e/server.py",
        "/static/index.html",
        "/static/",
        "/static/APP.JS",
        "/static/web/app.js",
        "/web/app.js",
        "/index.html",
        "/static/..%5Cserver.py",
    ],
)
def test_only_the_listed_files_are_served(demo_server, path):
    status, body = raw_get(demo_server.port, path)
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


def test_defaults_are_the_model_defaults_per_mode(demo_server, demo):
    model, tok = demo
    with httpx.Client(base_url=demo_server.url, timeout=10) as h:
        d = h.get("/illada/defaults").json()
    assert d["model"] == "illada-demo" and d["mode"] == make_spec(model, tok, 0).mode
    exact, fast = d["modes"]["exact"], d["modes"]["fast"]
    assert exact["max_tokens"] == 128 and exact["rule"] == "schedule"
    want = make_spec(model, tok, 0, mode="fast")  # the bundled model's own rule (diffusion_config.json)
    assert (fast["rule"], fast["error_bound"], fast["block_refresh"]) == (want.rule, want.error_bound, "drift")
    assert fast["block_length"] == want.block_length
    for name, m in d["modes"].items():  # the settings panel's block refresh
        assert m["block_refresh"] == make_spec(model, tok, 0, mode=name).block_refresh
    assert d["end_tokens"] == [model.args.eos_token_id, model.args.eot_token_id]


# ------------------------------------------------------------------------------------------ the step events
@pytest.mark.parametrize(
    "diffusion,stream,message",
    [
        ({"steps": "yes"}, True, "diffusion.steps must be true or false"),
        ({"steps": 1}, True, "diffusion.steps must be true or false"),
        ({"steps": True}, False, "diffusion.steps needs stream: true"),
    ],
)
def test_steps_option_is_checked(demo_server, diffusion, stream, message):
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": stream, "diffusion": diffusion}
    with httpx.Client(base_url=demo_server.url, timeout=30) as h:
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


@pytest.mark.parametrize(
    "diffusion,n",
    [
        ({"mode": "variable", "block_length": 8, "steps_per_block": 4}, 1),  # batched, several blocks
        ({"mode": "fast", "block_length": 8}, 2),  # batched rows of one request, threshold commits
        ({"mode": "exact", "block_length": 8, "steps_per_block": 4}, 1),  # decoded alone, a fixed canvas past EOS
    ],
)
def test_step_events_replay_into_exactly_the_final_text(client, demo, diffusion, n):
    model, tok = demo
    prompts = ["reverse hello", "sort 3 1 2"]
    spec = make_spec(model, tok, 0)

    def ask(p):
        stream = client.chat.completions.create(
            model="illada-demo",
            messages=[{"role": "user", "content": p}],
            max_tokens=32,
            n=n,
            stream=True,
            extra_body={"diffusion": {**diffusion, "steps": True}},
        )
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
    chunks = list(
        client.completions.create(
            model="illada-demo",
            prompt=prompt,
            max_tokens=16,
            stream=True,
            extra_body={"diffusion": {"mode": "variable", "block_length": 8, "steps_per_block": 8, "steps": True}},
        )
    )
    ((said, replayed),) = replay(chunks, tok, make_spec(model, tok, 0), chat=False).values()
    assert said and replayed == said


def test_ordinary_streams_carry_nothing_new(demo_server):
    body = {
        "messages": [{"role": "user", "content": "reverse hello"}],
        "stream": True,
        "max_tokens": 16,
        "diffusion": {"mode": "variable", "block_length": 8, "steps_per_block": 8},
    }
    for steps in (None, False):
        if steps is not None:
            body["diffusion"]["steps"] = steps
        with httpx.Client(base_url=demo_server.url, timeout=60) as h:
            lines = [x for x in h.post("/chat/completions", json=body).text.split("\n\n") if x]
        chunks = [json.loads(x[6:]) for x in lines[:-1]]
        assert lines[-1] == "data: [DONE]" and len(chunks) <= 2 + 2  # the role, a chunk per block, the end
        assert all(set(c) == {"id", "object", "created", "model", "choices"} for c in chunks)


# ------------------------------------------------------------------------------------------ a JSON schema's steps
SCHEMA = {
    "type": "object",
    "properties": {
        "word": {"type": "string", "maxLength": 6},
        "n": {"type": "integer", "minimum": 0, "maximum": 999},
        "ok": {"type": "boolean"},
        "pick": {"enum": ["left", "right"]},
    },
}


def structured_stream(demo_server, schema, steps, mode):
    """(the content's text, the step events' diffusion fields) of a streamed json_schema chat answer."""
    body = {
        "messages": [{"role": "user", "content": "reverse hello"}],
        "stream": True,
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
        "diffusion": {"mode": mode, "steps": steps},
    }
    with httpx.Client(base_url=demo_server.url, timeout=120) as h:
        r = h.post("/chat/completions", json=body)
    assert r.status_code == 200, r.text
    chunks = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return text, [c["diffusion"] for c in chunks if "diffusion" in c]


@pytest.mark.parametrize("mode", ["fast", "variable"])
def test_a_json_schema_s_steps_start_from_its_skeleton_and_only_fill_holes(demo_server, demo, mode):
    from illada_mlx.structured import Layout, TokenClasses, compile_schema

    model, tok = demo
    a = model.args
    layout = Layout(compile_schema(SCHEMA), tok, TokenClasses.of(tok, a.eos_token_id), a.mask_token_id)
    skeleton = {p: int(layout.ids[p]) for p in range(len(layout)) if layout.hole[p] < 0}
    choices = {p for p in range(len(layout)) if layout.hole[p] in layout.options}
    text, events = structured_stream(demo_server, SCHEMA, True, mode)
    first, later = events[0], events[1:]
    assert (first["block"], first["step"], first["start"], first["length"]) == (0, 0, 0, len(layout))
    assert {p: t for p, t, _ in first["fixed"]} == skeleton  # every fixed token, and only those
    assert {p for p, _, _ in first["commits"]} == choices  # the chosen options: filled from the start
    canvas = {p: t for p, t, _ in first["fixed"] + first["commits"]}
    for ev in later:
        assert "fixed" not in ev and ev["length"] == len(layout) and ev["block"] == 0
        for p, t, piece in ev["commits"]:
            assert p not in canvas and 0 <= p < len(layout)  # a hole still masked: never a fixed token
            assert piece == tok.decode([t])
            canvas[p] = t
    assert [ev["step"] for ev in events] == list(range(len(events)))
    assert sorted(canvas) == list(range(len(layout)))  # every hole filled by the last step
    answer = np.array([canvas[p] for p in range(len(layout))])
    chosen = {}
    for h, opts in layout.options.items():  # read each choice back from the canvas
        at = np.flatnonzero(layout.hole == h)
        padded = [o + [a.eos_token_id] * (len(at) - len(o)) for o in opts]
        chosen[h] = padded.index(answer[at].tolist())
    assert text == layout.render(answer, chosen)  # the last canvas is the answer's
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(json.loads(text), SCHEMA)
    assert structured_stream(demo_server, SCHEMA, False, mode) == (text, [])  # without steps: as before


# ------------------------------------------------------------------------------------------ the page in a browser
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class Counting:
    """The model, counting its forwards (the stop button's check)."""

    def __init__(self, model):
        self.model, self.args, self.forwards = model, model.args, 0

    def __call__(self, *a, **kw):
        self.forwards += 1
        return self.model(*a, **kw)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium: the browser test needs Debian's chromium (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (the test extra)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def wait_until(ok, seconds):
    """Poll ok() (the page's CSP refuses Playwright's string predicates, rightly)."""
    t0 = time.time()
    while not ok():
        assert time.time() - t0 < seconds, "timed out"
        time.sleep(0.05)


def ask_page(page, text):
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def last_reply(page, timeout=60_000):
    """The text of the newest reply once it is written."""
    page.wait_for_selector("#send:not([disabled])", timeout=timeout)
    return page.locator(".msg.assistant .text").last.inner_text()


@pytest.mark.slow  # a browser
def test_the_page_chats_draws_the_canvas_and_stops(browser, demo):
    """Against a server with an API key: the page asks for the key once, shows masks on the canvas, answers
    `reverse hello` with `olleh`, answers a second question with the whole conversation sent, a second tab
    answers meanwhile, and Stop ends a long exact-mode reply within one block."""
    from illada_mlx.engine import generate_text

    model, tok = demo
    counting = Counting(model)
    srv = Server(counting, tok, "illada-demo", opts=Options(api_key="sekrit", allowed_hosts=("127.0.0.1",)))
    context = browser.new_context(viewport={"width": 1000, "height": 640})
    try:
        page = context.new_page()
        sent = []
        page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.method == "POST" else None)
        page.goto(f"http://127.0.0.1:{srv.port}/")
        page.wait_for_selector("#key:not([hidden])", timeout=10_000)  # the API answered 401: the key form
        page.fill("#key-input", "sekrit")
        page.click("#key button")
        page.wait_for_selector("#mode option", state="attached", timeout=10_000)
        assert page.input_value("#mode") == make_spec(model, tok, 0).mode

        # the official decode, one token a step, so masks show (the default fills this block in one step)
        page.select_option("#mode", "variable")
        ask_page(page, "reverse hello")
        page.wait_for_selector(".msg.assistant .canvas .cell.mask", timeout=30_000)  # masks, step by step
        assert last_reply(page) == "olleh"
        assert "forwards" in page.locator(".msg.assistant .stats").last.inner_text()
        page.select_option("#mode", make_spec(model, tok, 0).mode)  # back to the default for what follows

        other = context.new_page()  # a second tab: the key is kept, it is not asked again
        other.goto(f"http://127.0.0.1:{srv.port}/")
        other.wait_for_selector("#mode option", state="attached", timeout=10_000)
        assert other.is_hidden("#key")
        ask_page(page, "a=4 b=8 ; b?")
        ask_page(other, "reverse abc")
        history = [
            {"role": "user", "content": "reverse hello"},
            {"role": "assistant", "content": "olleh"},
            {"role": "user", "content": "a=4 b=8 ; b?"},
        ]
        assert last_reply(page) == generate_text(model, tok, history) != ""
        assert last_reply(other) == generate_text(model, tok, [{"role": "user", "content": "reverse abc"}])
        assert [m["content"] for m in sent[1]["messages"]] == [m["content"] for m in history]
        other.close()

        # a long exact-mode reply (8 blocks of 8 steps) in a new conversation, stopped during its first block
        page.click("#new-chat")
        page.select_option("#mode", "exact")
        page.fill("#max_tokens", "256")
        page.fill("#steps_per_block", "8")
        steps = page.evaluate("window.illadaSteps")
        served = srv.engine.served
        ask_page(page, "reverse hello world")
        wait_until(lambda: page.evaluate("window.illadaSteps") >= steps + 4, 30)  # half of block 0
        OUT.mkdir(exist_ok=True)
        shot = OUT / "webchat-canvas.png"
        page.screenshot(path=str(shot))
        print(f"\nthe canvas mid-reply: {shot}")
        at_stop, t0 = counting.forwards, time.time()
        page.click("#stop")
        assert last_reply(page, timeout=10_000) is not None
        wait_until(lambda: srv.engine.served > served, 30)  # the stopped request has ended
        assert counting.forwards - at_stop <= 8, "more than one block ran after Stop"
        assert page.locator(".msg.assistant .stats").last.inner_text() == "stopped"
        drawn = page.evaluate("window.illadaSteps")
        time.sleep(0.5)
        assert page.evaluate("window.illadaSteps") == drawn  # nothing is drawn after Stop

        # stopped before any text, the question stays in the conversation the page shows and sends next
        page.select_option("#mode", "fast")  # the server answers the next request at once
        page.select_option("#block_refresh", "full")
        t0 = time.time()
        ask_page(page, "reverse hello")
        assert last_reply(page, timeout=20_000) is not None and time.time() - t0 < 20
        assert [m["content"] for m in sent[-1]["messages"]] == ["reverse hello world", "reverse hello"]
        assert sent[-1]["diffusion"]["block_refresh"] == "full"

        page.click("#new-chat")
        page.select_option("#block_refresh", "drift")  # the fast mode's default: not sent
        ask_page(page, "reverse hello")
        assert last_reply(page, timeout=20_000) == "olleh"
        assert page.locator(".msg").count() == 2 and len(sent[-1]["messages"]) == 1
        assert "block_refresh" not in sent[-1]["diffusion"]
    finally:
        context.close()
        srv.stop()


class Slow:
    """The model, a little slower per forward, so a page has time to show each step."""

    def __init__(self, model, seconds):
        self.model, self.args, self.seconds = model, model.args, seconds

    def __call__(self, *a, **kw):
        time.sleep(self.seconds)
        return self.model(*a, **kw)


HOSTILE = '<img src=x onerror="window.pwned=1">'  # a key the page must show as text


def cell_text(piece: str) -> str:
    """A token's text as the page's canvas cell shows it (app.js `visible`)."""
    return "\u2205" if piece == "" else piece.replace("\n", "\u21b5").replace(" ", "\u2423")


@pytest.mark.slow  # a browser
def test_the_page_asks_for_json_and_draws_the_schema_s_skeleton(browser, demo):
    """The JSON schema box: invalid JSON is an inline error and nothing is sent; a schema goes as
    response_format, the canvas shows the template's fixed text (dimmed cells, in order, with masks at the
    holes) and the reply is JSON valid against it; a key with markup stays text; an unsupported schema is
    the server's error; a cleared box asks for plain text again."""
    from illada_mlx.structured import Layout, TokenClasses, compile_schema

    jsonschema = pytest.importorskip("jsonschema")
    model, tok = demo
    a = model.args
    schema = {
        "type": "object",
        "properties": {
            HOSTILE: {"type": "string", "maxLength": 4},
            "ok": {"type": "boolean"},
            "n": {"type": "integer", "minimum": 0, "maximum": 99},
        },
    }
    layout = Layout(compile_schema(schema), tok, TokenClasses.of(tok, a.eos_token_id), a.mask_token_id)
    skeleton = [cell_text(tok.decode([t])) for t, h in zip(layout.ids.tolist(), layout.hole) if h < 0]
    srv = Server(Slow(model, 0.4), tok, "illada-demo")
    page = browser.new_page(viewport={"width": 1000, "height": 640})
    try:
        sent = []
        page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.method == "POST" else None)
        page.goto(f"http://127.0.0.1:{srv.port}/")
        page.wait_for_selector("#mode option", state="attached", timeout=10_000)
        page.click("#json summary")
        for bad, says in (("{nope", "not JSON"), ("[1]", "a JSON schema is an object")):
            page.fill("#schema", bad)
            assert page.is_visible("#schema-error") and page.inner_text("#schema-error").startswith(says)
            ask_page(page, "reverse hello")
            time.sleep(0.3)
            assert not sent and page.input_value("#prompt") == "reverse hello"  # kept, nothing sent

        page.click("#schema-example")  # the placeholder's example: a schema the server compiles
        compile_schema(json.loads(page.input_value("#schema")))
        assert page.is_hidden("#schema-error") and page.inner_text("#schema-state") == "(on)"
        page.fill("#schema", json.dumps(schema))
        assert page.is_hidden("#schema-error") and page.inner_text("#schema-state") == "(on)"
        page.select_option("#mode", "variable")
        page.press("#prompt", "Enter")
        page.wait_for_selector(".msg.assistant .canvas .cell.fixed", timeout=30_000)
        fixed = page.locator(".msg.assistant .canvas .cell.fixed").all_inner_texts()
        masks = page.locator(".msg.assistant .canvas .cell.mask").count()
        cells = page.locator(".msg.assistant .canvas .cell").count()
        OUT.mkdir(exist_ok=True)
        page.screenshot(path=str(OUT / "webchat-skeleton.png"))
        assert fixed == skeleton and masks > 0 and cells == len(layout)
        value = json.loads(last_reply(page))
        jsonschema.validate(value, schema)
        assert (
            HOSTILE in value
            and page.locator("img").count() == 0
            and page.evaluate("typeof window.pwned") == "undefined"
        )
        assert sent[-1]["response_format"] == {"type": "json_schema", "json_schema": {"name": "page", "schema": schema}}

        page.fill("#schema", '{"oneOf": []}')  # valid JSON, a feature the server refuses by name
        ask_page(page, "reverse hello")
        last_reply(page)
        assert "'oneOf'" in page.locator(".msg.assistant .stats").last.inner_text()

        page.fill("#schema", "")
        assert page.inner_text("#schema-state") == ""
        ask_page(page, "reverse hello")
        last_reply(page)
        assert "response_format" not in sent[-1]
    finally:
        page.close()
        srv.stop()
