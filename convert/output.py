"""Where the converter writes: the destination's safety rules, its temporary directories, and the sweep of
what a killed run left behind.

A destination is replaced only when it is empty or recognizably a converted model (config.json marked
`illada_mlx_format` and nothing but the files convert writes); never a symlink, a filesystem root, the
current or home directory or one of their parents, the source, a parent of the source or a directory
inside it. Output is written into `.NAME.tmp-XXXXXXXX` beside the destination; a replaced destination
is first moved into `.NAME.old-XXXXXXXX` (illada_mlx.workdirs: each is marked as ours and flock()ed by
the run that made it, so a later convert into the same parent, or a load of a model there, tells a dead
run's leftovers from a live run's work and from a user's files: it removes them, or moves a moved-aside
destination back when the run died before putting the new one in its place). During a conversion SIGTERM and SIGHUP
are handled like Ctrl-C (the temp dir is removed), and all three wait while the destination is swapped.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

from illada_mlx.config import IlladaError
from illada_mlx.files import parse_json_object
from illada_mlx.load import CONVERTED_FILES
from illada_mlx.workdirs import MARKER, SHARD, WorkDir, unmark
from illada_mlx.workdirs import sweep as sweep_workdirs

WRITTEN = {*CONVERTED_FILES, MARKER}  # the marker stays in a destination only when a kill came just after its rename
SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP during a conversion, handled like Ctrl-C; `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def stop_hook(point: str) -> None:
    """For the kill tests: stop this process (SIGSTOP) at `point` when ILLADA_MLX_CONVERT_STOP_AT names it,
    so a test can signal the conversion at a known state."""
    if os.environ.get("ILLADA_MLX_CONVERT_STOP_AT") == point:
        os.kill(os.getpid(), signal.SIGSTOP)


_held: Optional[list] = None  # signals received while a `signals_deferred` block runs


def _interrupt(signum: int) -> KeyboardInterrupt:
    return KeyboardInterrupt() if signum == signal.SIGINT else Interrupted(signum)


def _handler(signum, frame):
    if _held is not None:
        _held.append(signum)
        return
    raise _interrupt(signum)


@contextmanager
def signals_as_interrupts():
    """Ctrl-C, SIGTERM and SIGHUP raise KeyboardInterrupt (SIGTERM and SIGHUP as `Interrupted`) while the
    block runs, so the same cleanup as Ctrl-C's runs; in the main thread only (elsewhere Python cannot set
    handlers, and the defaults stay)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def signals_deferred():
    """Inside `signals_as_interrupts`: a signal arriving while the block runs is held back and raised when it
    ends (Python runs signal handlers in the main thread, so this holds whichever thread the OS picked)."""
    global _held
    outer, _held = _held, []
    try:
        yield
    except BaseException:
        _held = outer
        raise
    held, _held = _held, outer
    if held:
        raise _interrupt(held[0])


# ------------------------------------------------------------------------------------------ the destination
def _describe(path: Path) -> Optional[str]:
    """Why `path` (an existing directory) is not recognizably a converted model, or None when it is."""
    entries = sorted(os.listdir(path))
    foreign = [e for e in entries if e not in WRITTEN and not SHARD.match(e)]
    if foreign:
        return f"it holds {foreign[0]!r}, which convert does not write"
    odd = [e for e in entries if not stat.S_ISREG(os.lstat(path / e).st_mode)]
    if odd:
        return f"{odd[0]!r} is not a regular file"
    if "config.json" not in entries:
        return "it has no config.json"
    try:
        marked = parse_json_object((path / "config.json").read_bytes(), path / "config.json").get("illada_mlx_format")
    except IlladaError:
        marked = None
    return None if marked else "its config.json is not an illada-mlx one"


def has_only_our_names(path: Path) -> bool:
    """`path` is a real directory holding only regular files with names convert writes (contents unchecked)."""
    if path.is_symlink() or not path.is_dir():
        return False
    return all((e in WRITTEN or SHARD.match(e)) and stat.S_ISREG(os.lstat(path / e).st_mode) for e in os.listdir(path))


def _protected(dst: Path) -> Optional[str]:
    if dst.parent == dst:
        return "a filesystem root"
    for name, d in (("the current directory", Path.cwd()), ("your home directory", Path.home())):
        d = Path(os.path.realpath(d))
        if dst == d or dst in d.parents:
            return name if dst == d else f"a parent of {name}"
    return None


def check_destination(mlx_path: str) -> Path:
    """The destination, resolved; refused when it is empty, a symlink or a protected directory."""
    if not str(mlx_path).strip():
        raise IlladaError("--mlx-path is empty; name a new directory for the converted model")
    raw = Path(mlx_path).expanduser()
    if raw.is_symlink():
        raise IlladaError(
            f"{raw} is a symlink; convert writes only to a real directory: pass the path it points "
            "to, or another --mlx-path"
        )
    dst = Path(os.path.realpath(raw))
    why = _protected(dst)
    if why:
        raise IlladaError(f"{dst} is {why}; convert never writes there: name a new directory for --mlx-path")
    return dst


def check_replaceable(dst: Path, force: bool) -> None:
    """An existing destination may be written over: empty, or (with force) a converted model."""
    if not os.path.lexists(dst):
        return
    if dst.is_symlink() or not dst.is_dir():
        raise IlladaError(f"{dst} exists and is not a directory; choose another --mlx-path")
    if not os.listdir(dst):
        return
    why = _describe(dst)
    if why:
        raise IlladaError(
            f"{dst} is not empty and not a converted model ({why}); --force replaces only "
            "convert's own output: choose another --mlx-path"
        )
    if not force:
        raise IlladaError(f"{dst} exists and is not empty; choose another --mlx-path or pass --force to replace it")


def check_apart_from_source(dst: Path, src: Path) -> None:
    """The destination is neither the source, nor a parent of it, nor inside it."""
    src = Path(os.path.realpath(src))
    if dst == src or dst in src.parents:
        raise IlladaError(f"--mlx-path {dst} is the source checkpoint or contains it; choose a directory outside it")
    if src in dst.parents:
        raise IlladaError(f"--mlx-path {dst} is inside the source checkpoint {src}; choose a directory outside it")


# ------------------------------------------------------------------------------------------ temp dirs, sweep
def sweep(parent: Path, notice: Callable[[str], None]) -> None:
    """Remove dead runs' `.NAME.tmp-*` / `.NAME.old-*` directories in `parent` (illada_mlx.workdirs)."""
    sweep_workdirs(parent, WRITTEN, notice)


def stderr_notice(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def swap_in(tmp: WorkDir, dst: Path) -> None:
    """Rename the finished temp dir to `dst`; an existing `dst` is moved aside first and removed after.
    Signals are held back meanwhile; if the process dies in between, the next run's sweep moves it back."""
    with signals_deferred():
        if not os.path.lexists(dst):
            os.replace(tmp.path, dst)
            unmark(dst)
            return
        old = WorkDir(dst, "old")
        try:
            os.replace(dst, old.path / "x")
            try:
                stop_hook("swapping")
                os.replace(tmp.path, dst)
            except BaseException:
                os.replace(old.path / "x", dst)
                raise
            unmark(dst)
            shutil.rmtree(old.path, ignore_errors=True)
        finally:
            old.close()
            if old.path.exists() and not (old.path / "x").exists():
                shutil.rmtree(old.path, ignore_errors=True)
