"""Reading a model directory and nothing else: every file is checked before it is opened.

A file a model directory names (config, tokenizer, index, shard) must be a plain name inside the
directory (no absolute path, no `..`), must resolve inside the directory (a symlink pointing elsewhere is
refused; for a hub snapshot, inside the repo's cache folder, where the hub keeps the files the snapshot
links to) and must be a regular file (a FIFO or device would block or never end). JSON is read as UTF-8
into an object, its nesting depth bounded.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from .errors import IlladaError

MAX_JSON_BYTES = 256 << 20  # the largest JSON side file read (tokenizer.json of a big vocabulary is ~10 MB)


def boundary(root: Path) -> Path:
    """The folder every file of `root` must resolve into: the directory itself, or for a hub snapshot
    (`models--ORG--NAME/snapshots/REV`) the repo's cache folder."""
    real = Path(os.path.realpath(root))
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent
    return real


def check_name(root: Path, name: str, what: str) -> Path:
    """root / name for a plain file name (no directory part, not absolute, not `.` or `..`)."""
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\0" in name
        or os.path.isabs(name)
    ):
        raise IlladaError(f"{root}: {what} names {name!r}, which is not a file in the model directory; fix the index")
    return Path(root) / name


def check_file(root: Path, path: Path) -> Path:
    """`path` (in `root`) if it resolves inside root's boundary and is a regular file; else refused
    before anything is opened."""
    path = Path(path)
    real = Path(os.path.realpath(path))
    inside = boundary(root)
    if real != inside and inside not in real.parents:
        raise IlladaError(
            f"{path}: a symlink to {real}, outside the model directory; copy the file into {root} instead of linking it"
        )
    try:
        mode = os.stat(real).st_mode
    except OSError as e:
        raise IlladaError(f"{path}: cannot be read ({e.strerror}); check the file")
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)"
        raise IlladaError(f"{path}: {kind}; a model directory holds regular files only")
    return path


def read_bytes(root: Path, path: Path, limit: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of a checked file, refused beyond `limit` bytes."""
    check_file(root, path)
    size = os.stat(path).st_size
    if size > limit:
        raise IlladaError(f"{path}: {size} bytes, more than a file of this kind holds ({limit}); check the file")
    return Path(path).read_bytes()


def parse_json_object(data: bytes, path: Path) -> dict:
    """A JSON object from UTF-8 bytes; refused when not UTF-8, not JSON, nested too deeply or not an object."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise IlladaError(
            f"{path}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); re-download the file"
        )
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise IlladaError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); re-download the file")
    except RecursionError:
        raise IlladaError(f"{path}: JSON nested too deeply to be a model file; re-download the file")
    if not isinstance(value, dict):
        raise IlladaError(f"{path}: a JSON {type(value).__name__}, not an object; re-download the file")
    return value


def read_json_object(root: Path, name: str) -> dict:
    """root/name, checked and parsed as a JSON object."""
    path = check_name(root, name, "a file")
    return parse_json_object(read_bytes(root, path), path)


def read_user_file(path: str, option: str, limit: int) -> bytes:
    """The bytes of a file an option names: a regular file of at most `limit` bytes. It is opened without
    blocking and checked on the open descriptor, so a FIFO, device or directory is refused unread."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise IlladaError(f"{option} {path}: cannot be read ({e.strerror}); check the path")
    mode, size = os.fstat(fd).st_mode, os.fstat(fd).st_size
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)"
        raise IlladaError(f"{option} {path} is {kind}; pass a regular file")
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1) if size <= limit else b""
    if size > limit or len(data) > limit:
        raise IlladaError(
            f"{option} {path} holds more than {limit} bytes, more than this command reads; pass a smaller file"
        )
    return data


def read_json_file(path: str, option: str, limit: int = MAX_JSON_BYTES) -> dict:
    """A JSON object from a file an option names (`read_user_file`'s rules, then `parse_json_object`'s)."""
    return parse_json_object(read_user_file(path, option, limit), Path(path))


def check_writable(path: Path, option: str) -> None:
    """Refuse, before any work, a file that could not be written at the end: an existing file is opened for
    appending (nothing written), a new one tried as a temporary file in its nearest existing folder."""
    import tempfile

    try:
        if path.exists():
            with open(path, "ab"):
                pass
            return
        folder = next(p for p in path.parents if p.exists())
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise IlladaError(f"{option} {path} cannot be written ({e.strerror}); name a file in a writable folder")


def check_output_file(path: str, option: str) -> Path:
    """A file a command is asked to write: a new path or an existing regular file (overwritten); never a
    directory, a symlink, a FIFO or device, or an empty name."""
    if not str(path).strip():
        raise IlladaError(f"{option} is empty; name the file to write")
    p = Path(path).expanduser()
    if p.is_symlink():
        raise IlladaError(f"{option} {p} is a symlink; name a regular file to write")
    if p.exists() and not p.is_file():
        kind = "a directory" if p.is_dir() else "not a regular file"
        raise IlladaError(f"{option} {p} is {kind}; name a file to write")
    if p.parent.exists() and not p.parent.is_dir():
        raise IlladaError(f"{option} {p}: {p.parent} is not a directory; name a file in a directory")
    return p
