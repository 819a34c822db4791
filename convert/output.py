"""Where the converter writes: the destination's safety rules, its temporary directories, and the sweep of
what a killed run left behind.

A destination is replaced only when it is empty or recognizably a converted model (config.json marked
`illada_mlx_format` and nothing but the files convert writes); never a symlink, a filesystem root, the
current or home directory or one of their parents, the source, a parent of the source or a directory
inside it. Output is written into `.NAME.tmp-XXXXXXXX` beside the destination; a replaced destination
is first moved into `.NAME.old-XXXXXXXX`. Each such directory is flock()ed by the run that made it
(the lock dies with the process, SIGKILL included), and made under a lock on the parent, so a later run
tells a dead run's leftovers from a live run's work: it removes them, or moves a moved-aside destination
back when the run died before putting the new one in its place. During a conversion SIGTERM and SIGHUP
are handled like Ctrl-C (the temp dir is removed), and all three wait while the destination is swapped.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

from illada_mlx.config import IlladaError
from illada_mlx.files import parse_json_object
from illada_mlx.load import SIDE_FILES

WRITTEN = {"config.json", "README.md", "model.safetensors.index.json", *SIDE_FILES}
SHARD = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")
IN_PROGRESS = re.compile(r"^model-\d{5}\.safetensors$")  # shards before their final names
LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[a-z0-9_]{8}$")
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
        raise IlladaError(f"{raw} is a symlink; convert writes only to a real directory: pass the path it points "
                          "to, or another --mlx-path")
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
        raise IlladaError(f"{dst} is not empty and not a converted model ({why}); --force replaces only "
                          "convert's own output: choose another --mlx-path")
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
@contextmanager
def parent_locked(parent: Path):
    """An exclusive flock on the parent directory while temp dirs are made or swept (no lock where the
    directory cannot be opened for reading)."""
    try:
        fd = os.open(parent, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _lock(path: Path, wait: bool) -> Optional[int]:
    """An fd holding an exclusive flock on directory `path`, or None when another process holds it."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class WorkDir:
    """A `.NAME.KIND-XXXXXXXX` directory beside the destination, locked by this process until closed."""

    def __init__(self, dst: Path, kind: str):
        with parent_locked(dst.parent):
            self.path = Path(tempfile.mkdtemp(prefix=f".{dst.name}.{kind}-", dir=dst.parent))
            self.fd = _lock(self.path, wait=True)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _is_leftover(path: Path, kind: str) -> bool:
    if kind == "tmp":
        return all(e in WRITTEN or SHARD.match(e) or IN_PROGRESS.match(e) for e in os.listdir(path))
    return os.listdir(path) in ([], ["x"])


def sweep(parent: Path, notice: Callable[[str], None]) -> None:
    """Remove dead runs' `.NAME.tmp-*` / `.NAME.old-*` directories in `parent`, moving a moved-aside
    destination back when its new version never arrived; one notice line saying what was done."""
    if not parent.is_dir():
        return
    removed, restored = [], []
    with parent_locked(parent):
        for entry in sorted(os.listdir(parent)):
            m = LEFTOVER.match(entry)
            path = parent / entry
            if not m or path.is_symlink() or not path.is_dir() or not _is_leftover(path, m["kind"]):
                continue
            fd = _lock(path, wait=False)
            if fd is None:
                continue  # a live conversion's
            try:
                target = parent / m["name"]
                if m["kind"] == "old" and (path / "x").is_dir() and not os.path.lexists(target):
                    os.replace(path / "x", target)
                    restored.append(m["name"])
                shutil.rmtree(path, ignore_errors=True)
                removed.append(entry)
            finally:
                os.close(fd)
    if removed:
        back = f"; moved {', '.join(restored)} back into place" if restored else ""
        notice(f"removed what an interrupted conversion left in {parent}: {', '.join(removed)}{back}")


def stderr_notice(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def swap_in(tmp: WorkDir, dst: Path) -> None:
    """Rename the finished temp dir to `dst`; an existing `dst` is moved aside first and removed after.
    Signals are held back meanwhile; if the process dies in between, the next run's sweep moves it back."""
    with signals_deferred():
        if not os.path.lexists(dst):
            os.replace(tmp.path, dst)
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
            shutil.rmtree(old.path, ignore_errors=True)
        finally:
            old.close()
            if old.path.exists() and not (old.path / "x").exists():
                shutil.rmtree(old.path, ignore_errors=True)
