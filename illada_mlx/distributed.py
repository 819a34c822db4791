"""More than one process (`mlx.launch`): the group, rank 0's I/O, agreement checks, data-parallel splits and
the watchdog.

MLX is the engine: `mx.distributed` (ring over TCP/Thunderbolt, MPI, JACCL) carries every collective and
`mlx.nn.layers.distributed` shards the linear layers (Model.shard). Not launched, `group()` is MLX's size-1
group and every helper here is the identity, so single-process code paths are unchanged.

- tensor parallel (Model.shard): every rank holds 1/N of each layer and runs the same decode in lockstep;
  the ranks pick the same tokens because they see the same logits and share one seed (`shared_seed`).
- data parallel (bench, eval): `split` gives each rank a contiguous share of the work, `gather` puts the
  ranks' results back in the original order on every rank; rank 0 reports.
- the watchdog (tensor parallel: `watch`): a collective whose peer died or hangs blocks forever. A thread
  (it runs while the main thread waits inside MLX) exits the process with one line when no progress
  (`beat`: a forward, which the sharded embedding reports (shard.py), or a finished exchange) is seen for
  ILLADA_DIST_TIMEOUT seconds (default 300); `idle()` pauses it while a rank waits on purpose (for a chat
  line). mlx.launch itself terminates the other ranks
  when one exits with an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Optional, Sequence

import mlx.core as mx
import numpy as np

from .config import IlladaError

TIMEOUT_ENV = "ILLADA_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 300.0

_group: Optional[mx.distributed.Group] = None


def group() -> mx.distributed.Group:
    """The process group (size 1 unless launched with mlx.launch)."""
    global _group
    if _group is None:
        _group = mx.distributed.init()
    return _group


def watch(g: mx.distributed.Group) -> None:
    """Start the watchdog (once) for work whose every step waits on the other ranks: tensor parallel. Data
    parallel does not start it: its ranks work alone and meet only to gather, where a quick rank may wait
    for as long as the others take."""
    if g.size() > 1:
        _watchdog.start(g.rank(), timeout())


def timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        value = -1.0
    if not value > 0:
        raise IlladaError(f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds; fix it")
    return value


def is_main(g: Optional[mx.distributed.Group] = None) -> bool:
    return (g or group()).rank() == 0


# ------------------------------------------------------------------------------------------ watchdog
class Watchdog:
    """Exits the process (one line on stderr, code 1) when `beat` has not been called for `seconds`."""

    def __init__(self):
        self.last = time.monotonic()
        self.paused = 0
        self.thread: Optional[threading.Thread] = None

    def start(self, rank: int, seconds: float) -> None:
        self.rank, self.seconds, self.last = rank, seconds, time.monotonic()
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="illada-watchdog", daemon=True)
            self.thread.start()

    def beat(self) -> None:
        self.last = time.monotonic()

    def _run(self) -> None:
        while True:
            time.sleep(min(1.0, self.seconds / 4))
            if not self.paused and time.monotonic() - self.last > self.seconds:
                sys.__stderr__.write(
                    f"error: rank {self.rank}: no reply from the other ranks for {self.seconds:g} s "
                    f"(a rank died?); exiting\n"
                )
                sys.__stderr__.flush()
                os._exit(1)


_watchdog = Watchdog()


def beat() -> None:
    """Progress: the last collective finished (or none is pending)."""
    _watchdog.beat()


@contextmanager
def idle():
    """The watchdog pauses: this rank waits on purpose (rank 0 for a user's line, the others for rank 0's)."""
    _watchdog.paused += 1
    try:
        yield
    finally:
        _watchdog.paused -= 1
        _watchdog.beat()


# ------------------------------------------------------------------------------------------ objects
def _all_bytes(g: mx.distributed.Group, data: bytes) -> list[bytes]:
    """Every rank's bytes, in rank order, on every rank."""
    sizes = mx.distributed.all_gather(mx.array([len(data)], dtype=mx.int32), group=g).tolist()
    width = max(max(sizes), 1)
    buf = np.zeros(width, dtype=np.uint8)
    buf[: len(data)] = np.frombuffer(data, dtype=np.uint8)
    rows = np.array(mx.distributed.all_gather(mx.array(buf), group=g)).reshape(g.size(), width)
    beat()
    return [row[:n].tobytes() for row, n in zip(rows, sizes)]


def all_objects(g: mx.distributed.Group, obj) -> list:
    """Every rank's JSON-able `obj`, in rank order, on every rank."""
    if g.size() == 1:
        return [obj]
    return [json.loads(b) for b in _all_bytes(g, json.dumps(obj).encode())]


def broadcast(g: mx.distributed.Group, obj=None):
    """Rank 0's JSON-able `obj` on every rank (the others' `obj` is ignored)."""
    if g.size() == 1:
        return obj
    return all_objects(g, obj if g.rank() == 0 else None)[0]


def decide(g: mx.distributed.Group, flag: bool) -> bool:
    """Rank 0's yes/no on every rank (the others' `flag` is ignored): one small collective."""
    if g.size() == 1:
        return flag
    total = mx.distributed.all_sum(mx.array([int(flag) if g.rank() == 0 else 0]), group=g).item()
    beat()
    return bool(total)


def barrier(g: mx.distributed.Group) -> None:
    if g.size() > 1:
        mx.eval(mx.distributed.all_sum(mx.zeros((1,)), group=g))
        beat()


def shared_seed(g: mx.distributed.Group, seed: Optional[int]) -> Optional[int]:
    """`seed`, or with several ranks and no seed, one rank 0 draws for all (sampling must agree)."""
    if g.size() == 1 or seed is not None:
        return seed
    return broadcast(g, time.time_ns() % 2**31)


# ------------------------------------------------------------------------------------------ agreement
def file_digests(items: dict[str, bytes]) -> dict[str, str]:
    """name -> the first 16 hex digits of the SHA-256 of its bytes (what check_same compares across ranks)."""
    return {k: hashlib.sha256(v).hexdigest()[:16] for k, v in items.items()}


def check_same(g: mx.distributed.Group, items: dict[str, bytes], what: str) -> None:
    """Refuse (on every rank) when any rank's `items` differ from rank 0's: one line naming the first item."""
    if g.size() == 1:
        return
    watch(g)
    everyone = all_objects(g, file_digests(items))
    for r, theirs in enumerate(everyone[1:], 1):
        bad = [k for k in everyone[0] if theirs.get(k) != everyone[0][k]]
        if bad:
            raise IlladaError(
                f"rank {r} has a different {what} from rank 0 ({bad[0]} differs); every rank must "
                "load the same files (copy the directory to every machine)"
            )


# ------------------------------------------------------------------------------------------ data parallel
def split(items: Sequence, rank: int, size: int) -> list:
    """This rank's contiguous share of `items` (sizes differ by at most one, the first ranks larger)."""
    n, extra = divmod(len(items), size)
    start = rank * n + min(rank, extra)
    return list(items[start : start + n + (rank < extra)])


def gather(g: mx.distributed.Group, part: list) -> list:
    """The ranks' `split` shares' results (JSON-able), concatenated back in the original order, on every rank.
    The watchdog (if running) waits meanwhile: a rank whose share was quicker may wait long for the others."""
    if g.size() == 1:
        return list(part)
    with idle():
        return [x for rank_part in all_objects(g, part) for x in rank_part]


# ------------------------------------------------------------------------------------------ output
class _ErrorsOnly:
    """stderr of a rank other than 0: only `error:` lines get through, tagged with the rank."""

    def __init__(self, stream, rank: int):
        self.stream, self.rank = stream, rank

    def write(self, s: str) -> int:
        if s.startswith("error: ") and not s.startswith("error: rank "):
            self.stream.write(f"error: rank {self.rank}: {s[7:]}")
            self.stream.flush()
        return len(s)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self):
        return self.stream.fileno()


def quiet_others(g: mx.distributed.Group) -> None:
    """Ranks other than 0 print nothing but their `error:` lines (rank 0 does the I/O)."""
    if g.rank() == 0:
        return
    sys.stdout = open(os.devnull, "w")
    sys.stderr = _ErrorsOnly(sys.stderr, g.rank())
