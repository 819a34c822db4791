"""`illada-mlx chat`: a multi-turn conversation on stdin/stdout, one stats block per reply on stderr."""

from __future__ import annotations

import click

from ..options import Command
from . import widgets
from .common import given_settings, load_or_convert_demo, ranks, sampler_options, utf8_text
from .repl import Chat, chat_line


@click.command("chat", cls=Command)
@click.option("--system", "--system-prompt", "system", default=None, help="System text for the conversation.")
@click.option("--visual/--no-visual", default=False, help="Show the canvas being denoised (TTY only).")
@sampler_options
def command(system, visual, model_path, mask_id, **kw):
    """Multi-turn chat. /reset clears the history, /settings shows the decoding settings, /quit ends.
    Ctrl-C interrupts a reply, not the session (under mlx.launch it ends the session). A line that is not
    UTF-8, or that the chat template refuses, gets one `error:` line and is skipped."""
    from .. import distributed as dist
    from ..spec import make_spec

    g = ranks()
    system = utf8_text(system, "--system") if system else system
    model, tok = load_or_convert_demo(model_path, mask_id, group=g)
    kw["seed"] = dist.shared_seed(g, kw.get("seed"))
    settings = given_settings(kw)
    make_spec(model, tok, None, **settings)  # refuse bad options before the first question
    chat = Chat(model, tok, settings, system, visual and widgets.stdout_is_terminal())
    click.echo("illada-mlx chat: /reset, /settings, /quit. Ctrl-C stops a reply.", err=True)
    while (line := chat_line(g)) is not None and line.strip() != "/quit":
        line = line.rstrip("\n")
        if line.strip() == "/reset":
            chat.reset()
            click.echo("(history cleared)", err=True)
        elif line.strip() == "/settings":
            click.echo(chat.settings_text(), err=True)
        elif line.strip():
            chat.reply(line)
