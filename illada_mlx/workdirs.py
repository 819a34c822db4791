"""The converter's work directories beside a destination, and the sweep of what a killed run left there.

A conversion writes into `.NAME.tmp-XXXXXXXX` beside its destination and moves a replaced destination
into `.NAME.old-XXXXXXXX`. Each holds a marker file (MARKER: what made it, its pid) written when it is made,
and is flock()ed by the run that made it until that run ends (the lock dies with the process, SIGKILL
included); both happen under a lock on the parent. So a later run tells a dead run's leftovers from a live
run's work and from anything else: `sweep` removes a directory only when its name has that form, it holds
the marker and nothing but what a conversion writes, and no process holds its lock. It lives in the library
so that both `convert` (into any destination in that parent) and `load` (of a model in it) sweep.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Collection, Optional

LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[a-z0-9_]{8}$")
MARKER = ".illada-mlx-convert"  # in every work directory: this project made it
SHARD = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")
IN_PROGRESS = re.compile(r"^model-\d{5}\.safetensors$")  # shards before their final names


@contextmanager
def parent_locked(parent: Path):
    """An exclusive flock on the parent directory while work dirs are made or swept (no lock where the
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


def lock_dir(path: Path, wait: bool) -> Optional[int]:
    """An fd holding an exclusive flock on directory `path`, or None when another process holds it."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class WorkDir:
    """A `.NAME.KIND-XXXXXXXX` directory beside the destination, marked as ours and locked by this process
    until closed."""

    def __init__(self, dst: Path, kind: str):
        with parent_locked(dst.parent):
            self.path = Path(tempfile.mkdtemp(prefix=f".{dst.name}.{kind}-", dir=dst.parent))
            self.fd = lock_dir(self.path, wait=True)
            (self.path / MARKER).write_text(f"illada-mlx convert, pid {os.getpid()}\n")

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def unmark(directory: Path) -> None:
    """Remove the marker from a work dir that became the destination (renamed: a kill before this leaves the
    marker there, which a converted model may hold)."""
    (directory / MARKER).unlink(missing_ok=True)


def _ours(path: Path, kind: str, written: Collection[str]) -> bool:
    """`path` holds our marker and nothing but what a conversion puts there (regular files; an old one's
    moved-aside destination `x`)."""
    marker = path / MARKER
    if not (marker.is_file() and not marker.is_symlink() and marker.read_bytes().startswith(b"illada-mlx convert")):
        return False
    entries = [e for e in os.listdir(path) if e != MARKER]
    if kind == "old":
        return entries in ([], ["x"])
    return all(
        (e in written or SHARD.match(e) or IN_PROGRESS.match(e)) and stat.S_ISREG(os.lstat(path / e).st_mode)
        for e in entries
    )


def sweep(parent: Path, written: Collection[str], notice: Callable[[str], None]) -> None:
    """Remove dead runs' work directories in `parent` (`written`: the file names a conversion writes beside
    its shards), moving a moved-aside destination back when its new version never arrived; one notice line
    saying what was done. Nothing happens where `parent` cannot be read or written."""
    try:
        entries = sorted(os.listdir(parent)) if parent.is_dir() else []
    except OSError:
        return
    removed, restored = [], []
    with parent_locked(parent):
        for entry in entries:
            m, path = LEFTOVER.match(entry), parent / entry
            try:
                if not m or path.is_symlink() or not path.is_dir() or not _ours(path, m["kind"], written):
                    continue
                fd = lock_dir(path, wait=False)
            except OSError:
                continue
            if fd is None:
                continue  # a live conversion's
            try:
                if _remove(parent, path, m):
                    restored.append(m["name"])
                removed.append(entry)
            finally:
                os.close(fd)
    if removed:
        back = f"; moved {', '.join(restored)} back into place" if restored else ""
        notice(f"removed what an interrupted conversion left in {parent}: {', '.join(removed)}{back}")


def _remove(parent: Path, path: Path, m: re.Match) -> bool:
    """Remove a dead run's work dir; first move its moved-aside destination back when nothing took its
    place (returns whether it did)."""
    target, back = parent / m["name"], False
    if m["kind"] == "old" and (path / "x").is_dir() and not os.path.lexists(target):
        os.replace(path / "x", target)
        back = True
    shutil.rmtree(path, ignore_errors=True)
    return back
