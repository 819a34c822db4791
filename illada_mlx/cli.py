"""The `illada-mlx` command: convert, generate, chat, serve, bench.

This module composes the library (`illada_mlx`) and the converter (`illada_mlx_convert`): it is the one
place in the package that imports the converter.
"""

from __future__ import annotations

import shutil
import sys
import time
from contextlib import contextmanager

import click

from .cache import CACHES, REFRESHES
from .config import IlladaError, one_line
from .options import SEED, FiniteFloat, Group, IntList
from .settings import SETTINGS
from .spec import PRESETS


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="illada-mlx")
@click.option("--debug", is_flag=True, help="Show the traceback of a failure (also ILLADA_MLX_DEBUG=1).")
def main(debug):
    """Run iLLaDA / LLaDA masked-diffusion language models with MLX.

    A failure is one `error:` line on stderr: exit code 1, or 2 for a bad option."""


def _add_convert():
    from illada_mlx_convert.cli import convert_command

    main.add_command(convert_command)


_add_convert()


# ------------------------------------------------------------------------------------------ shared options
def ranks():
    """The process group: size 1, or the ranks of `mlx.launch`, where rank 0 alone prints (see distributed.py)."""
    from . import distributed as dist

    g = dist.group()
    if g.size() > 1:
        dist.quiet_others(g)
    return g


def load_model(model_path, mask_id=None, group=None):
    """(model, tokenizer); no path: the bundled demo model, converted into the cache on first use (by rank 0
    first when launched, so ranks sharing a cache do not convert at once). With a group of several ranks
    the model is tensor-parallel."""
    from . import distributed as dist
    from .load import load

    g = dist.group()
    if model_path is None:
        from illada_mlx_convert import ensure_demo_model

        for turn in (True, False):  # rank 0, then the others
            if dist.is_main(g) == turn:
                model_path = ensure_demo_model(notice=lambda m: click.echo(m, err=True))
            dist.barrier(g)
    return load(
        str(model_path),
        mask_id=mask_id,
        group=group,
        progress=True,
        notice=lambda m: click.echo(f"warning: {m}", err=True),
    )


PARALLEL = click.option(
    "--parallel",
    type=click.Choice(["data", "tensor"]),
    default="data",
    show_default=True,
    help="Under mlx.launch: data = every rank holds the whole model and takes a share of the "
    "prompts; tensor = the model is split across the ranks (Model.shard).",
)


MODE_HELP = "; ".join(f"{name} = {p.about}" for name, p in PRESETS.items())


def setting_option(s):
    """The click option of a registry setting (settings.py): its flags, a type that checks its range, its help."""
    if s.kind is str:
        kind = click.Choice(list(s.choices))
    elif s.kind is int:
        kind = click.IntRange(s.lo, s.hi)
    else:
        kind = FiniteFloat(s.lo, s.hi, min_open=s.lo_open)
    about = f" {MODE_HELP}." if s.name == "mode" else ""
    return click.option(*s.flags, s.name, type=kind, default=None, help=s.usage(accepts=False) + about)


def sampler_options(f):
    """The decoding options generate/chat share: the registry's settings that have CLI flags, and the model,
    stop strings, the think boost and the mask id. Unset ones take the model's defaults (see --help)."""
    opts = [
        click.option(
            "--model", "model_path", default=None, help="MLX dir, HF dir or hub id (default: the bundled demo model)."
        )
    ]
    opts += [setting_option(s) for s in SETTINGS if s.flags]
    opts += [
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
        click.option("--think-boost/--no-think-boost", default=None, help="iLLaDA-Instruct end-of-thinking boost."),
        click.option("--mask-id", type=click.IntRange(min=0), default=None, help="Override the mask token id."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _settings(kw: dict) -> dict:
    """The options the user gave, as make_spec settings (None = the model's / mode's default)."""
    s = {k: v for k, v in kw.items() if v is not None}
    if "stop" in s:
        s["stop"] = tuple(s["stop"])
    return s


def prompt_line(r) -> str:
    """The prompt's figures: a diffusion model has no prompt-only pass, so the rate is the first forward's,
    which runs the prompt and the masks together, labelled as such."""
    if r.first_forward_positions:
        return (
            f"Prompt: {r.prompt_tokens} tokens; first forward (prompt + masks): {r.first_forward_positions} "
            f"positions in {r.first_forward_s:.3f} s, {r.prompt_tps:.3f} positions-per-sec"
        )
    return f"Prompt: {r.prompt_tokens} tokens; first forward: {r.first_forward_s:.3f} s"


def stats_block(r, compute: str = "") -> str:
    """mlx-lm's stats block, plus the diffusion figures, what ran and the compute dtype (`compute`)."""
    sp, st = r.spec, r.stats
    what = (
        f"{sp.mode}: {sp.canvas} canvas, budget {sp.max_tokens}, block {sp.block_length}, "
        f"{sp.steps_per_block} steps/block, rule {sp.rule}"
        + (f" {sp.rule_number}" if sp.rule_number is not None else "")
        + f", cache {sp.cache}"
        + (f", refresh {sp.block_refresh}" if sp.cache != "none" else "")
        + (f" ({st.drift_refreshes} whole-canvas)" if sp.cache != "none" and sp.block_refresh == "drift" else "")
    )
    return (
        "==========\n"
        f"{prompt_line(r)}\n"
        f"Generation: {r.generation_tokens} tokens, {st.tokens_per_s:.3f} tokens-per-sec\n"
        f"Diffusion: {st.nfe} forwards, {st.tokens_per_forward:.2f} tokens/forward, finish {r.finish_reason} "
        f"({what})\n"
        f"Peak memory: {r.peak_memory:.3f} GB" + (f"\nCompute: {compute}" if compute else "")
    )


def compute_note(model) -> str:
    """'float32 on cpu': the dtype the model computes in, on which backend (backend.py chose it)."""
    from .backend import backend_name, compute_dtype

    return f"{compute_dtype(model)} on {backend_name()}"


def settings_text(sp) -> str:
    """chat's /settings: the decode settings a person chooses, one topic per line."""
    commits = f"{sp.rule} {sp.rule_number}" if sp.rule_number is not None else f"{sp.rule} ({sp.remasking})"
    sampling = (
        "temperature 0 (greedy)"
        if sp.temperature == 0
        else (f"temperature {sp.temperature}, top_p {sp.top_p}, top_k {sp.top_k}, min_p {sp.min_p}")
    )
    seed = "none" if sp.seed is None else sp.seed
    cache = f"{sp.cache}, block refresh {sp.block_refresh}" if sp.cache != "none" else "none"
    cache += f" (drift threshold {sp.drift_threshold})" if sp.cache != "none" and sp.block_refresh == "drift" else ""
    ends = ", ".join(f"{n} {t}" for n, t in (("EOS", sp.eos_id), ("EoT", sp.eot_id)) if t is not None)
    stops = ", ".join(repr(x) for x in sp.stop) or "none"
    lines = [
        f"mode: {sp.mode} ({sp.canvas} canvas, budget {sp.max_tokens} tokens)",
        f"blocks: {sp.block_length} tokens, {sp.steps_per_block} steps each",
        f"commits: {commits}",
        f"sampling: {sampling}; seed {seed}",
        f"cache: {cache}",
        f"ends: {ends or 'none'}; stop strings: {stops}",
    ]
    if sp.think_boost or sp.cfg_scale:
        lines.append(f"extras: think boost {sp.think_boost}, cfg scale {sp.cfg_scale}")
    return "\n".join(lines)


class Progress:
    """A status on a terminal's stderr while a reply is written (block of the budget, tokens/s); nothing
    when stderr is not a terminal. When stdout is the same terminal the status sits after the streamed
    text and is erased before more text is written."""

    def __init__(self, enabled=None):
        self.on = sys.stderr.isatty() if enabled is None else enabled
        self.inline = self.on and sys.stdout.isatty()
        self.shown, self.col, self.last, self.msg = 0, 0, 0.0, ""
        self.width = shutil.get_terminal_size().columns

    def _draw(self):
        if not self.msg:
            return
        msg = f" [{self.msg}]" if self.inline else self.msg
        if self.inline and self.col + len(msg) >= self.width:
            return
        sys.stdout.flush()
        sys.stderr.write(msg if self.inline else "\r\033[K" + msg)
        sys.stderr.flush()
        self.shown = len(msg)

    def clear(self):
        if self.on and self.shown:
            sys.stderr.write(f"\033[{self.shown}D\033[K" if self.inline else "\r\033[K")
            sys.stderr.flush()
            self.shown = 0

    def status(self, msg: str, force: bool = False):
        now = time.perf_counter()
        if not self.on or (not force and now - self.last < 0.1):
            return
        self.last, self.msg = now, msg
        self.clear()
        self._draw()

    def text(self, s: str):
        """Write reply text to stdout, keeping the status out of its way."""
        if not s:
            return
        self.clear()
        sys.stdout.write(s)
        sys.stdout.flush()
        self.col = len(s.rsplit("\n", 1)[-1]) if "\n" in s else self.col + len(s)
        self._draw()

    def done(self):
        self.clear()
        self.msg = ""


def first_forward_log(model, prompt_tokens: int, progress: Progress):
    """The wait before the first forward ends (minutes for a big model on a CPU): a status on a terminal;
    in a log, for a model of progress.LOG_BELOW bytes or more, a line when it starts and one when it ends.
    Returns the step hook that ends it (None when there is nothing to end)."""
    from .bench import parameter_bytes
    from .progress import LOG_BELOW

    what = f"first forward: the prompt ({prompt_tokens} tokens) and the masks"
    t0 = time.perf_counter()
    if progress.on:
        progress.status(f"{what} ...", force=True)
        return None
    if sys.stderr.isatty() or parameter_bytes(model) < LOG_BELOW:
        return None
    click.echo(f"{what} ...", err=True)
    done = []

    def end(ev):
        if not done:
            done.append(True)
            positions = ev.canvas.shape[0] * ev.canvas.shape[1]
            click.echo(f"first forward done: {positions} positions in {time.perf_counter() - t0:.1f} s", err=True)

    return end


def stream_reply(model, tok, ids, settings, progress: Progress, cache=None, on_step=None, show_text=True):
    """Stream one reply to stdout (show_text) with a progress status; returns (last Response, text, tokens)."""
    from .engine import stream_generate

    t0 = time.perf_counter()
    n, total = [0], [0]
    log = first_forward_log(model, len(ids), progress)

    def step(ev):
        if on_step is not None:
            on_step(ev)
        if log is not None:
            log(ev)
        if total[0]:
            tps = n[0] / max(time.perf_counter() - t0, 1e-9)
            progress.status(f"block {ev.block + 1}/{total[0]}, step {ev.step + 1}, {n[0]} tokens, {tps:.1f} tok/s")

    r, parts, tokens = None, [], []
    try:
        for r in stream_generate(model, tok, ids, prompt_cache=cache, on_step=step, **settings):
            total[0], n[0] = r.blocks, r.generation_tokens
            parts.append(r.text)
            tokens.extend(r.tokens)
            if show_text:
                progress.text(r.text)
    finally:
        progress.done()
    return r, "".join(parts), tokens


def utf8_text(text: str, what: str) -> str:
    """`text` when it is valid Unicode; refused when it came from bytes that are not UTF-8 (Python keeps
    such argv bytes as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise IlladaError(f"{what} is not valid UTF-8 (a bad byte at character {e.start}); fix its encoding")
    return text


def decode_utf8(data: bytes, what: str) -> str:
    """Bytes from stdin as text; refused when not UTF-8 (nothing is guessed or replaced)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise IlladaError(
            f"{what} is not valid UTF-8 (byte {data[e.start]:#04x} at offset {e.start}); fix its encoding"
        )


def stdin_prompt() -> str:
    """The prompt piped on stdin, less the one line end that `echo` or a file's last line adds."""
    text = decode_utf8(sys.stdin.buffer.read(), "stdin")
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


def prompt_ids(tok, msgs, raw=False) -> list[int]:
    """build_prompt, with a chat template that fails reported as one line."""
    from jinja2 import TemplateError

    from .engine import build_prompt

    try:
        return build_prompt(tok, msgs, raw=raw)
    except TemplateError as e:
        raise IlladaError(
            f"the model's chat template failed ({one_line(e)}); pass --raw to skip it, or fix "
            "chat_template in the model's tokenizer_config.json"
        )


def _stdout_is_terminal() -> bool:
    """`chat --visual` draws frames only on a terminal (a test replaces this to see them)."""
    return sys.stdout.isatty()


@main.command()
@click.option("--prompt", "-p", required=True, help="The prompt ('-' reads stdin); UTF-8 text.")
@click.option(
    "--system", "--system-prompt", "system", default=None, help="System text (merged into the first user turn)."
)
@click.option("--raw", "--ignore-chat-template", "raw", is_flag=True, help="No chat template (base models).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@sampler_options
def generate(prompt, system, raw, as_json, model_path, mask_id, **kw):
    """Generate a reply to one prompt, streamed block by block; stats on stderr. SIGTERM or SIGHUP ends it
    with one line (`interrupted (signal N)`), even in the middle of a forward."""
    with ending_on_signals():
        generate_reply(prompt, system, raw, as_json, model_path, mask_id, **kw)


def generate_reply(prompt, system, raw, as_json, model_path, mask_id, **kw):
    """The generate command's work (signals handled by the caller)."""
    import json

    from . import distributed as dist
    from .backend import backend_name, compute_dtype

    g = ranks()
    if prompt == "-" and g.size() > 1:
        raise IlladaError(
            "--prompt - does not work under mlx.launch (it never closes the ranks' stdin); pass the "
            "prompt as --prompt TEXT"
        )
    prompt = stdin_prompt() if prompt == "-" else utf8_text(prompt, "--prompt")
    system = utf8_text(system, "--system") if system else system
    model, tok = load_model(model_path, mask_id, group=g)
    kw["seed"] = dist.shared_seed(g, kw.get("seed"))
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    ids = prompt_ids(tok, msgs, raw=raw)
    r, text, tokens = stream_reply(model, tok, ids, _settings(kw), Progress(), show_text=not as_json)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "text": text,
                    "tokens": tokens,
                    "finish_reason": r.finish_reason,
                    "prompt_tokens": r.prompt_tokens,
                    "settings": r.spec.as_dict(),
                    "stats": {
                        **r.stats.as_dict(),
                        "prompt_tps": r.prompt_tps,
                        "first_forward_s": r.first_forward_s,
                        "first_forward_positions": r.first_forward_positions,
                        "compute_dtype": compute_dtype(model),
                        "backend": backend_name(),
                    },
                }
            )
        )
    else:
        click.echo()
        click.echo(stats_block(r, compute_note(model)), err=True)


@contextmanager
def ending_on_signals():
    """While the block runs, SIGTERM and SIGHUP end the command with one line on stderr and exit code
    128 + N. A watcher thread reads the signal from Python's wakeup fd and exits, so the line comes at once
    even while the main thread is inside a long MLX computation (Python runs signal handlers only when it
    returns). Nothing is left to clean up: generate writes only to stdout. The previous handlers and wakeup
    fd come back after the block (the commands also run in-process, under click's test runner)."""
    import os
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = [getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]
    r, w = os.pipe()
    os.set_blocking(w, False)
    previous_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    previous = {s: signal.signal(s, lambda *_: None) for s in wanted}  # Python writes the fd; the watcher acts

    def watch():
        while data := os.read(r, 64):
            hit = next((b for b in data if b in wanted), None)
            if hit is not None:
                sys.stdout.flush()
                lead = "\n" if sys.stdout.isatty() else ""  # off the streamed text's line
                os.write(2, f"{lead}interrupted (signal {hit})\n".encode())
                os._exit(128 + hit)
        os.close(r)

    watcher = threading.Thread(target=watch, daemon=True, name="illada-signals")
    watcher.start()
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        signal.set_wakeup_fd(previous_fd)
        os.close(w)  # the watcher reads the end and stops
        watcher.join(1.0)


# ------------------------------------------------------------------------------------------ chat
class CanvasView:
    """Draws the reply's canvas in place: committed tokens as text, masked slots as ░."""

    MASK_GLYPH = "░"

    def __init__(self, tok, mask_id, prompt_len, out=None):
        self.tok, self.mask_id, self.P, self.out = tok, mask_id, prompt_len, out or sys.stdout
        self.pieces = {mask_id: self.MASK_GLYPH}  # token id -> its text, decoded once per id
        self.out.write("\0337")  # save the cursor: every frame redraws from here

    def frame(self, ev):
        import numpy as np

        if 0 not in ev.rows:
            return
        row = np.array(ev.canvas[ev.rows.index(0), self.P :]).tolist()
        for t in set(row) - self.pieces.keys():
            self.pieces[t] = self.tok.decode([t])
        parts = [self.pieces[t] for t in row]
        self.out.write("\0338\033[J" + "".join(parts))
        self.out.flush()

    def finish(self, text):
        self.out.write("\0338\033[J" + text + "\n")
        self.out.flush()


def read_line():
    """One chat line from stdin (with a prompt on a terminal), None at the end; a line that is not UTF-8
    is refused (IlladaError)."""
    if sys.stdin.isatty():
        return utf8_text(input(">>> "), "this line")
    data = sys.stdin.buffer.readline()
    return decode_utf8(data, "this line") if data else None


def chat_line(g):
    """The next chat line: None at the end, "" for a line to skip. Rank 0 reads stdin; under mlx.launch every
    rank gets rank 0's line (the watchdog waits meanwhile: nobody is late while the user types)."""
    from . import distributed as dist

    line = None
    with dist.idle():
        if dist.is_main(g):
            try:
                line = read_line()
            except (EOFError, KeyboardInterrupt):
                line = None
            except IlladaError as e:
                click.echo(f"error: {e}; line skipped", err=True)
                line = ""
        return dist.broadcast(g, line)


@main.command()
@click.option("--system", "--system-prompt", "system", default=None, help="System text for the conversation.")
@click.option("--visual/--no-visual", default=False, help="Show the canvas being denoised (TTY only).")
@sampler_options
def chat(system, visual, model_path, mask_id, **kw):
    """Multi-turn chat. /reset clears the history, /settings shows the decoding settings, /quit ends.
    Ctrl-C interrupts a reply, not the session (under mlx.launch it ends the session). A line that is not
    UTF-8, or that the chat template refuses, gets one `error:` line and is skipped."""
    from . import distributed as dist
    from .cache import BlockCache
    from .spec import make_spec

    g = ranks()
    system = utf8_text(system, "--system") if system else system
    model, tok = load_model(model_path, mask_id, group=g)
    kw["seed"] = dist.shared_seed(g, kw.get("seed"))
    settings = _settings(kw)
    make_spec(model, tok, None, **settings)  # refuse bad options before the first question
    visual = visual and _stdout_is_terminal()
    history = [{"role": "system", "content": system}] if system else []
    cache = BlockCache()  # reused across turns when the mode has a cache on
    last_spec = None
    click.echo("illada-mlx chat: /reset, /settings, /quit. Ctrl-C stops a reply.", err=True)
    while True:
        line = chat_line(g)
        if line is None:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() == "/quit":
            break
        if line.strip() == "/reset":
            history = history[:1] if system else []
            cache = BlockCache()
            click.echo("(history cleared)", err=True)
            continue
        if line.strip() == "/settings":
            spec = last_spec or make_spec(
                model, tok, len(prompt_ids(tok, history + [{"role": "user", "content": ""}])), **settings
            )
            click.echo(settings_text(spec), err=True)
            continue
        history.append({"role": "user", "content": line})
        try:
            ids = prompt_ids(tok, history)
        except IlladaError as e:
            click.echo(f"error: {e}", err=True)
            history.pop()
            continue
        view = CanvasView(tok, model.args.mask_token_id, len(ids)) if visual else None
        try:
            r, reply, _ = stream_reply(
                model,
                tok,
                ids,
                settings,
                Progress(False if visual else None),
                cache=cache,
                on_step=view.frame if view else None,
                show_text=not visual,
            )
        except KeyboardInterrupt:
            click.echo("\n(interrupted)", err=True)
            history.pop()
            continue
        if view:
            view.finish(reply)
        else:
            click.echo()
        click.echo(stats_block(r, compute_note(model)), err=True)
        last_spec = r.spec
        history.append({"role": "assistant", "content": reply})


# ------------------------------------------------------------------------------------------ serve
def check_listen(host: str, port: int) -> None:
    """Refuse, before the model loads, an address the server could not listen on (a name that does not
    resolve, a port in use, an address not on this machine)."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            s.bind(addr)
    except OSError as e:
        raise IlladaError(
            f"cannot listen on {host}:{port} ({e.strerror or one_line(e)}); choose another --host or --port"
        )


@main.command()
@click.option("--model", "model_path", default=None, help="MLX dir, HF dir or hub id (default: the demo model).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address (localhost by default).")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--max-queue",
    default=16,
    show_default=True,
    type=click.IntRange(min=1),
    help="Requests waiting beyond this (at least 1) get 429.",
)
@click.option(
    "--max-batch",
    default=8,
    show_default=True,
    type=click.IntRange(1, 256),
    help="Rows decoded together (compatible requests join the running batch at block boundaries); "
    "1 under mlx.launch with several ranks.",
)
@click.option(
    "--max-request-seconds",
    default=600.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="A request running longer ends with finish_reason time_limit.",
)
@click.option(
    "--api-key",
    envvar="ILLADA_MLX_API_KEY",
    default=None,
    help="Require Authorization: Bearer KEY (also from ILLADA_MLX_API_KEY).",
)
@click.option(
    "--allowed-hosts",
    default=None,
    help="Comma list of Host header names accepted, or '*' for any "
    "(default: the bound host; localhost names on loopback).",
)
@click.option("--allowed-origins", default="", help="Comma list of origins allowed by CORS (default: none).")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="info: one line per request.",
)
@click.option("--mask-id", type=click.IntRange(min=0), default=None)
def serve(
    model_path,
    host,
    port,
    max_queue,
    max_batch,
    max_request_seconds,
    api_key,
    allowed_hosts,
    allowed_origins,
    log_level,
    mask_id,
):
    """OpenAI-compatible HTTP server: /v1/models, /v1/chat/completions, /v1/completions, /health.
    Under mlx.launch the model is split across the ranks (tensor parallel): rank 0 serves, one request at a
    time (no batching), and the other ranks run each decode with it."""
    import os
    from pathlib import Path

    from . import distributed as dist
    from .listen import check_api_key, host_names
    from .server import Options, follow
    from .server import Scheduler as Engine
    from .server import serve as run

    g = ranks()
    if api_key is None and os.environ.get("ILLADA_MLX_API_KEY") == "":  # click reads an empty variable as unset
        api_key = ""
    api_key, hosts = check_api_key(api_key, "--api-key (or ILLADA_MLX_API_KEY)"), host_names(allowed_hosts)
    if dist.is_main(g):
        check_listen(host, port)
    names = lambda v: tuple(x.strip().lower() for x in v.split(",") if x.strip()) if v else None  # noqa: E731
    model, tok = load_model(model_path, mask_id, group=g)
    if not dist.is_main(g):
        follow(model, tok, g)  # the same decodes as rank 0's, until its server stops
        return
    name = Path(str(model_path)).name if model_path else "illada-demo"
    engine = Engine(model, tok, name, max_queue, max_batch, max_request_seconds, group=g)
    opts = Options(api_key=api_key, allowed_hosts=hosts, allowed_origins=names(allowed_origins) or ())
    run(engine, host, port, opts, log_level, echo=lambda m: click.echo(m, err=True))


# ------------------------------------------------------------------------------------------ bench
def _names(value: str, table, what: str) -> list[str]:
    """A comma list of names from `table` (PRESETS, REFRESHES, ...), or one line naming the first bad one."""
    names = [m for m in value.split(",") if m]
    bad = [m for m in names if m not in table]
    if bad or not names:
        raise IlladaError(f"unknown {what} {bad[0] if bad else value!r}; choose from {', '.join(table)}")
    return names


def _modes(value: str) -> list[str]:
    return _names(value, PRESETS, "mode")


@main.command()
@click.option("--model", "model_path", default=None, help="Model dir (default: the demo model, or --shape).")
@click.option(
    "--shape",
    type=click.Choice(["tiny", "small", "8b"]),
    default=None,
    help="A random-weight model of this shape instead of a checkpoint (8b = iLLaDA-8B dims).",
)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--modes", default="exact,fast", show_default=True, help=f"Comma list of {','.join(PRESETS)}.")
@click.option(
    "--gen-length",
    "gen_lengths",
    type=IntList(),
    default="256",
    show_default=True,
    help="Comma list of budgets (with --shape every run writes the whole budget).",
)
@click.option("--block-length", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--prompt-lengths",
    type=IntList(allow_auto=True),
    default="auto",
    show_default=True,
    help="Comma list of prompt lengths (random tokens), or auto: demo prompts / 16,128.",
)
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--refresh",
    "refreshes",
    default="drift",
    show_default=True,
    help=f"Comma list of block refresh policies for the cached modes ({','.join(REFRESHES)}).",
)
@click.option(
    "--caches",
    default="",
    help=f"Comma list of caches for the cached modes ({','.join(CACHES[1:])}; default: each mode's own).",
)
@click.option("--baselines", default="", help="Comma list of torch,ar: the official PyTorch loop, mlx-lm AR.")
@click.option("--json", "json_out", default=None, help="Write the results JSON here.")
@click.option("--plot", "plot_out", default=None, help="Write a PNG here (needs matplotlib: the `plot` extra).")
@PARALLEL
def bench(
    model_path,
    shape,
    dtype,
    modes,
    gen_lengths,
    block_length,
    prompt_lengths,
    repeats,
    refreshes,
    caches,
    baselines,
    json_out,
    plot_out,
    parallel,
):
    """Tokens/s (to EOS), forwards, tokens per forward, processed tokens, memory, per mode, with baselines.
    The table goes to stdout, progress to stderr. Under mlx.launch rank 0 reports: --parallel data splits the
    runs across the ranks, tensor splits the model (every run on every rank, in lockstep)."""
    import json
    import time as _time

    import mlx.core as mx

    from . import bench as B
    from . import distributed as dist
    from .backend import backend_name, compute_dtype
    from .files import check_output_file, check_writable

    g = ranks()
    tensor = parallel == "tensor" and g.size() > 1

    mode_list = _modes(modes)
    gens = gen_lengths
    json_path = check_output_file(json_out, "--json") if json_out is not None else None
    plot_path = check_output_file(plot_out, "--plot") if plot_out is not None else None
    for path, option in ((json_path, "--json"), (plot_path, "--plot")):
        if path is not None:
            check_writable(path, option)  # before the runs, not after them
    policies = _names(refreshes, REFRESHES, "refresh policy")
    cache_list = _names(caches, CACHES[1:], "cache") if caches else (None,)
    base = _names(baselines, B.BASELINE_NEEDS, "baseline") if baselines else []
    B.require_baselines(base)
    if plot_out:
        B.require_matplotlib()
    tok = None
    if shape:
        model = B.random_model(shape, getattr(mx, dtype))  # the same seed: the same weights on every rank
        if tensor:
            model.shard(g)
            mx.eval(model.parameters())
        name = f"random {shape} ({dtype})"
    else:
        model, tok = load_model(model_path, group=g if tensor else None)
        name = model_path or "illada-demo"
    if prompt_lengths == "auto" and tok is not None:
        texts = ["reverse qwerty", "sort 9 3 7 1 4 2"]  # the demo model's longest in-distribution answers
        prompts = {len(p): p for p in (prompt_ids(tok, [{"role": "user", "content": t}]) for t in texts)}
    else:
        lens = [16, 128] if prompt_lengths == "auto" else prompt_lengths
        import numpy as np

        rng = np.random.default_rng(0)
        prompts = {n: rng.integers(10, model.args.vocab_size, n).tolist() for n in lens}
    log = lambda m: click.echo(m, err=True)  # noqa: E731
    runs = B.bench_modes(
        model,
        prompts,
        mode_list,
        gens,
        repeats,
        tok,
        block_length,
        log,
        policies,
        ban_eos=shape is not None,
        caches=cache_list,
        group=g if g.size() > 1 and not tensor else None,
    )
    if not dist.is_main(g):
        return
    if any(r["output_tokens"] == 0 for r in runs):
        log(
            "note: rows with out 0 wrote nothing (the model ended its reply at once, as a trained model does "
            "after random tokens): their tok/s is '-'; --prompt-lengths auto or --shape measure whole replies"
        )
    first_prompt = next(iter(prompts.values()))
    for gen in gens:
        if "torch" in base and tensor:
            log("torch_official: skipped under --parallel tensor (it needs the whole model on one rank)")
        elif "torch" in base:
            r = B.bench_torch(model, first_prompt, gen, block_length, log)
            runs += [r] if r else []
        if "ar" in base:
            r = B.bench_ar(model.args, len(first_prompt), gen, log)
            runs += [r] if r else []
    result = {
        "model": name,
        "gen_lengths": gens,
        "block_length": block_length,
        "repeats": repeats,
        "date": _time.strftime("%Y-%m-%d"),
        "machine": B.machine(),
        "runs": runs,
        "ranks": g.size(),
        "parallel": parallel if g.size() > 1 else None,
        "parameter_bytes_per_rank": B.parameter_bytes(model),
        "compute_dtype": compute_dtype(model),
        "backend": backend_name(),
    }
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2))
    if plot_path:
        B.plot(result, str(plot_path))
    click.echo(B.table(runs))


# ------------------------------------------------------------------------------------------ eval
def _check_eval_args(tasks, compare, data, include_path, mc_num, batch_size, json_out) -> None:
    """What eval can refuse before it loads a model or scores anything."""
    import os

    from .files import check_output_file, check_writable

    if bool(tasks) == bool(compare):
        raise IlladaError("give either --tasks (lm-eval tasks) or --compare A B --data FILE")
    if compare and not data:
        raise IlladaError("--compare needs --data FILE.jsonl of prompt/answer objects")
    if mc_num % batch_size:
        raise IlladaError(
            f"--mc-num ({mc_num}) must be a multiple of batch_size (--batch-size {batch_size}), as "
            "in the official estimator"
        )
    if include_path is not None and not os.path.isdir(include_path):
        raise IlladaError(f"--include-path {include_path} is not a directory; name the folder of task YAMLs")
    if json_out is not None:
        check_writable(check_output_file(json_out, "--json"), "--json")


@main.command("eval")
@click.option("--model", "model_path", default=None, help="Model for --tasks (default: the demo model).")
@click.option("--tasks", default=None, help="Comma list of lm-eval tasks (needs the `eval` extra).")
@click.option("--include-path", default=None, help="A folder of local lm-eval task YAMLs.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many documents per task.")
@click.option("--num-fewshot", type=click.IntRange(0, 1024), default=None)
@click.option("--apply-chat-template", is_flag=True, help="Put each task prompt through the chat template.")
@click.option("--compare", nargs=2, default=None, metavar="A B", help="Two model dirs to compare on --data.")
@click.option("--data", default=None, help='JSONL of {"prompt", "answer"} for --compare.')
@click.option("--raw", is_flag=True, help="--compare: prompts as they are, no chat template.")
@click.option(
    "--mc-num",
    type=click.IntRange(1, 65536),
    default=128,
    show_default=True,
    help="Monte-Carlo samples per answer (a multiple of --batch-size).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 4096),
    default=32,
    show_default=True,
    help="Rows per forward (and mask group).",
)
@click.option("--cfg-scale", type=FiniteFloat(min=0), default=0.0, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True, help="0 to 2**32-1.")
@click.option(
    "--greedy-check/--no-greedy-check",
    default=True,
    show_default=True,
    help="--tasks: also run the official greedy check (is_greedy) per request; multiple-choice "
    "metrics do not use it, and skipping it about halves their time.",
)
@click.option("--mode", type=click.Choice(list(PRESETS)), default=None, help="Decoding mode for generation tasks.")
@click.option("--json", "json_out", default=None, help="Write the results JSON here.")
@PARALLEL
def eval_(
    model_path,
    tasks,
    include_path,
    limit,
    num_fewshot,
    apply_chat_template,
    compare,
    data,
    raw,
    mc_num,
    batch_size,
    cfg_scale,
    seed,
    greedy_check,
    mode,
    json_out,
    parallel,
):
    """Score a model: lm-eval tasks (--tasks), or two conversions against each other (--compare A B --data).
    Under mlx.launch rank 0 reports: --parallel data splits the requests across the ranks (the same scores
    as one process, in the same order), tensor splits the model."""
    from . import distributed as dist
    from . import evaluate as E

    g = ranks()
    tensor = parallel == "tensor" and g.size() > 1
    shard, share = (g if tensor else None), (g if g.size() > 1 and not tensor else None)
    _check_eval_args(tasks, compare, data, include_path, mc_num, batch_size, json_out)
    if compare:
        from tqdm import tqdm

        parsed = E.parse_items(data)  # every line checked before a model loads
        (ma, ta), (mb, tb) = load_model(compare[0], group=shard), load_model(compare[1], group=shard)
        if ta.get_vocab() != tb.get_vocab():
            raise IlladaError("the two models have different tokenizers; compare conversions of one model")
        items = E.encode_items(parsed, ta, raw=raw)
        with tqdm(
            total=len(items), desc="comparing", unit="item", file=sys.stderr, disable=not sys.stderr.isatty()
        ) as bar:
            r = E.compare(ma, mb, items, mc_num, batch_size, cfg_scale, seed, progress=bar.update, group=share)
        r.update(a=compare[0], b=compare[1], data=data)
        click.echo(E.summary_line(r))
    else:
        model, tok = load_model(model_path, group=shard)
        r = E.run_tasks(
            model,
            tok,
            [t for t in tasks.split(",") if t],
            include_path,
            limit,
            num_fewshot,
            apply_chat_template,
            mc_num=mc_num,
            batch_size=batch_size,
            cfg_scale=cfg_scale,
            seed=seed,
            greedy_check=greedy_check,
            mode=mode,
            group=share,
        )
        from lm_eval.utils import make_table

        click.echo(make_table(r))
    if json_out and dist.is_main(g):
        E.write_json(json_out, r)


if __name__ == "__main__":
    main()
