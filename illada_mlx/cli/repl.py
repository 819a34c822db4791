"""The chat REPL's pieces: reading a line (rank 0 reads, every rank gets it) and the conversation's turns."""

from __future__ import annotations

import sys

import click

from ..errors import IlladaError
from . import widgets
from .common import decode_utf8, templated_prompt, utf8_text


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
    from .. import distributed as dist

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


class Chat:
    """The conversation: its history, the block cache reused across turns, the settings of the last reply."""

    def __init__(self, model, tok, settings: dict, system, visual: bool):
        self.model, self.tok, self.settings, self.system, self.visual = model, tok, settings, system, visual
        self.reset()
        self.last_spec = None

    def reset(self):
        from ..cache import BlockCache

        self.history = [{"role": "system", "content": self.system}] if self.system else []
        self.cache = BlockCache()  # reused across turns when the mode has a cache on

    def settings_text(self) -> str:
        from ..spec import make_spec

        user = self.history + [{"role": "user", "content": ""}]
        spec = self.last_spec or make_spec(self.model, self.tok, len(templated_prompt(self.tok, user)), **self.settings)
        return widgets.settings_text(spec)

    def reply(self, line: str) -> None:
        """Answer one line (streamed, or drawn as a canvas with --visual); the turn is dropped on a failure."""
        self.history.append({"role": "user", "content": line})
        try:
            ids = templated_prompt(self.tok, self.history)
        except IlladaError as e:
            click.echo(f"error: {e}", err=True)
            self.history.pop()
            return
        view = widgets.CanvasView(self.tok, self.model.args.mask_token_id, len(ids)) if self.visual else None
        progress, on_step = widgets.Progress(False if view else None), view.frame if view else None
        try:
            r, text, _ = widgets.stream_reply(
                self.model, self.tok, ids, self.settings, progress, self.cache, on_step, not view
            )
        except KeyboardInterrupt:
            click.echo("\n(interrupted)", err=True)
            self.history.pop()
            return
        if view:
            view.finish(text)
        else:
            click.echo()
        click.echo(widgets.stats_block(r, widgets.compute_note(self.model)), err=True)
        self.last_spec = r.spec
        self.history.append({"role": "assistant", "content": text})
