"""The `illada-mlx` command: a dispatcher in mlx-lm's style over one module per command.

Each command lives in `illada_mlx.cli.<module>` and is imported only when it runs (or its own `-h` is
asked for): `illada-mlx -h` lists the commands from the table below without importing any of them, so it
never loads the converter. The package is the composition root: the one place that brings the library
(`illada_mlx`) and the converter (`illada_mlx_convert`) together.
"""

from __future__ import annotations

import importlib

import click

from ..options import Group

# name -> (module, the first sentence of the command's help: `-h`'s summary; a test keeps them equal)
COMMANDS = {
    "bench": (
        "bench",
        "Tokens/s (to EOS), forwards, tokens per forward, processed tokens, memory, per mode, with baselines.",
    ),
    "chat": ("chat", "Multi-turn chat."),
    "convert": ("convert", "Convert an HF checkpoint (iLLaDA or LLaDA layout) into an MLX model directory."),
    "eval": (
        "eval",
        "Score a model: lm-eval tasks (--tasks), or two conversions against each other (--compare A B --data).",
    ),
    "generate": ("generate", "Generate a reply to one prompt, streamed block by block; stats on stderr."),
    "serve": ("serve", "OpenAI-compatible HTTP server: /v1/models, /v1/chat/completions, /v1/completions, /health."),
}


def load_command(name: str) -> click.Command:
    """The command `name` (from COMMANDS), its module imported now."""
    return importlib.import_module(f"{__name__}.{COMMANDS[name][0]}").command


class LazyCommands(dict):
    """group.commands: a command is imported when it is first looked up."""

    def __missing__(self, name):
        if name not in COMMANDS:
            raise KeyError(name)
        self[name] = load_command(name)
        return self[name]


class LazyGroup(Group):
    """A group whose commands are imported on first use (`command` in the module named by COMMANDS)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.commands = LazyCommands()

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        return self.commands[name] if name in COMMANDS else None

    def format_commands(self, ctx, formatter):
        limit = formatter.width - 6 - max(len(n) for n in COMMANDS)
        short = lambda n: click.Command(n, help=COMMANDS[n][1]).get_short_help_str(limit)  # noqa: E731
        rows = [(n, short(n)) for n in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="illada-mlx")
@click.option("--debug", is_flag=True, help="Show the traceback of a failure (also ILLADA_MLX_DEBUG=1).")
def main(debug):
    """Run iLLaDA / LLaDA masked-diffusion language models with MLX.

    A failure is one `error:` line on stderr: exit code 1, or 2 for a bad option."""
