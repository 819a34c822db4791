"""What the commands share: the process group, loading a model (the demo model converted on first use),
the sampler options built from the settings registry, and reading the user's text as UTF-8."""

from __future__ import annotations

import functools
import sys
from contextlib import contextmanager

import click

from ..errors import IlladaError, one_line
from ..options import FiniteFloat
from ..settings import SETTINGS
from ..spec import PRESETS


def ranks():
    """The process group: size 1, or the ranks of `mlx.launch`, where rank 0 alone prints (see distributed.py)."""
    from .. import distributed as dist

    g = dist.group()
    if g.size() > 1:
        dist.quiet_others(g)
    return g


def load_or_convert_demo(model_path, mask_id=None, group=None):
    """load.load with the command line's extras: no path is the bundled demo model converted into the cache
    on first use (by rank 0 first when launched, so ranks sharing a cache do not convert at once), and the
    load's progress and notices go to stderr. With a group of several ranks the model is tensor-parallel."""
    from .. import distributed as dist
    from ..load import load

    g = dist.group()
    if model_path is None:
        from illada_mlx_convert import ensure_demo_model

        for turn in (True, False):  # rank 0, then the others
            if dist.is_main(g) == turn:
                model_path = ensure_demo_model(notice=lambda m: click.echo(m, err=True))
            dist.barrier(g)
    notice = lambda m: click.echo(f"warning: {m}", err=True)  # noqa: E731
    return load(str(model_path), mask_id=mask_id, group=group, progress=True, notice=notice)


shown = functools.partial(click.option, show_default=True)  # an option whose help shows its default

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


def given_settings(kw: dict) -> dict:
    """The options the user gave, as make_spec settings (None = the model's / mode's default)."""
    s = {k: v for k, v in kw.items() if v is not None}
    if "stop" in s:
        s["stop"] = tuple(s["stop"])
    return s


def comma_names(value: str, table, what: str) -> list[str]:
    """A comma list of names from `table` (PRESETS, REFRESHES, ...), or one line naming the first bad one."""
    names = [m for m in value.split(",") if m]
    bad = [m for m in names if m not in table]
    if bad or not names:
        raise IlladaError(f"unknown {what} {bad[0] if bad else value!r}; choose from {', '.join(table)}")
    return names


def mode_names(value: str) -> list[str]:
    """bench --modes: a comma list of presets."""
    return comma_names(value, PRESETS, "mode")


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


def templated_prompt(tok, msgs, raw=False) -> list[int]:
    """engine.build_prompt, with a chat template that fails reported as one line (IlladaError)."""
    from jinja2 import TemplateError

    from ..engine import build_prompt

    try:
        return build_prompt(tok, msgs, raw=raw)
    except TemplateError as e:
        raise IlladaError(
            f"the model's chat template failed ({one_line(e)}); pass --raw to skip it, or fix "
            "chat_template in the model's tokenizer_config.json"
        )


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
