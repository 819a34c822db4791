"""click pieces the commands share: option types that check their range (finite floats, comma lists of
positive integers) and command classes whose every failure is one `error:` line.

A bad option value (out of range, not a number) exits with 1 like every other failure (see
`one_line_errors`), other usage errors (an unknown or missing option) with 2, as click does;
tracebacks only with `--debug` or ILLADA_MLX_DEBUG=1.
"""

from __future__ import annotations

import math
import os
import sys
from contextlib import contextmanager

import click

from .errors import IlladaError, one_line
from .settings import SEED_MAX


def debug_enabled(flag: bool = False) -> bool:
    """Tracebacks wanted: `--debug` or ILLADA_MLX_DEBUG=1."""
    return flag or os.environ.get("ILLADA_MLX_DEBUG", "") not in ("", "0")


def describe_os_error(e: OSError) -> str:
    """'FILE: strerror' (both files for a rename), or the error's text when it names no file."""
    if e.strerror and e.filename is not None:
        names = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
        return f"{names}: {e.strerror}; check the path, its permissions and the free space"
    return f"{one_line(e) or type(e).__name__}; check the paths, their permissions and the free space"


@contextmanager
def one_line_errors(debug: bool = False):
    """For commands: a failure is one `error:` line on stderr and exit code 1 (Ctrl-C: 130; a signal the
    converter turned into an interrupt: 128 + its number), never a traceback unless `debug` or
    ILLADA_MLX_DEBUG=1. Our errors and OSError are expected; anything else is reported as a bug. click's
    own exceptions (usage errors, --help's exit) pass through to click."""
    try:
        yield
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", None)
        sys.stderr.write(f"interrupted{f' (signal {signum})' if signum else ''}\n")
        sys.exit(128 + signum if signum else 130)
    except Exception as e:
        if debug_enabled(debug) or isinstance(e, (click.ClickException, click.exceptions.Exit, click.Abort)):
            raise
        if isinstance(e, IlladaError):
            msg = one_line(e)
        elif isinstance(e, OSError):
            msg = describe_os_error(e)
        elif isinstance(e, MemoryError):
            msg = "out of memory; use a smaller model, budget or batch"
        else:
            msg = (
                f"unexpected {type(e).__name__}: {one_line(e)}; this is a bug: rerun with --debug "
                "(or ILLADA_MLX_DEBUG=1) and report the traceback"
            )
        sys.stderr.write(f"error: {msg}\n")
        sys.exit(1)


class FiniteFloat(click.FloatRange):
    """A float in a range, NaN and infinities refused."""

    name = "finite float"

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return v


class IntList(click.ParamType):
    """A comma list of whole numbers from 1 (`auto`, where allowed, passes through)."""

    name = "comma list of positive whole numbers"

    def __init__(self, allow_auto: bool = False):
        self.allow_auto = allow_auto

    def convert(self, value, param, ctx):
        if isinstance(value, list) or (self.allow_auto and value == "auto"):
            return value
        try:
            out = [int(x) for x in str(value).split(",") if x.strip()]
        except ValueError:
            out = []
        if not out or min(out) < 1:
            self.fail(
                f"{value!r} is not a comma list of positive whole numbers"
                + (" (or auto)" if self.allow_auto else "")
                + ".",
                param,
                ctx,
            )
        return out


# a bare command's usage screen (click >= 8.2 raises it; 8.1 prints the help itself)
NoArgsIsHelpError = getattr(click.exceptions, "NoArgsIsHelpError", ())

SEED = click.IntRange(0, SEED_MAX)


class OneLineErrors:
    """Mixin for click commands and groups: usage errors are one `error:` line (exit 1 for a bad value, 2
    for the rest), and the command's own failures go through `one_line_errors` (exit 1)."""

    def invoke(self, ctx):
        debug = bool(ctx.find_root().params.get("debug"))
        with one_line_errors(debug):
            return super().invoke(ctx)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except NoArgsIsHelpError as e:  # a bare command: its usage screen, as `-h` shows it
            click.echo(e.ctx.get_help())
            sys.exit(0)
        except click.UsageError as e:
            hint = f" (see `{e.ctx.command_path} -h`)" if e.ctx is not None else ""
            sys.stderr.write(f"error: {one_line(e.format_message())}{hint}\n")
            sys.exit(1 if isinstance(e, click.BadParameter) and not isinstance(e, click.MissingParameter) else 2)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.Abort:
            sys.stderr.write("aborted\n")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


class Command(OneLineErrors, click.Command):
    pass


class Group(OneLineErrors, click.Group):
    pass
