"""Progress while a person waits (loading, converting), and the one size unit every message uses.

On a terminal a tqdm bar; elsewhere (a log, a pipe) one line when the work starts and one when it ends, so
a log shows where a run is without a bar's carriage returns; work under LOG_BELOW bytes, over in a moment,
leaves no lines in a log. Sizes are decimal: GB = 10^9 bytes, MB = 10^6.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

LOG_BELOW = 100_000_000  # bytes: smaller work writes no start / end lines off a terminal


def format_bytes(n: float) -> str:
    """Bytes as decimal GB (10^9) from 1 GB up, else MB (10^6)."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


class Progress:
    """Progress of `total` bytes (unit "B") or items of work named `desc` ("loading", "converting").

    `about` is what the start line says of the work (a path, the file count). Use as a context manager:
    an exception erases the bar and writes no end line (the error is the line that stays)."""

    def __init__(
        self,
        desc: str,
        total: int,
        about: str = "",
        enabled: bool = True,
        unit: str = "B",
        stream: Optional[TextIO] = None,
    ):
        self.desc, self.total, self.unit, self.enabled = desc, total, unit, enabled
        self.stream = stream or sys.stderr
        self.t0, self.done, self.bar = time.perf_counter(), 0, None
        tty = self.stream.isatty()
        if not tty and unit == "B" and total < LOG_BELOW:
            self.enabled = enabled = False
        if not enabled:
            return
        if tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=unit, unit_scale=True, desc=desc, file=self.stream, leave=False)
        else:
            self._line(f"{desc}{' ' + about if about else ''}: {self._amount(total)} ...")

    def _amount(self, n: int) -> str:
        return format_bytes(n) if self.unit == "B" else f"{n} {self.unit}"

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def finish(self) -> None:
        """The end line (or the bar closed): what was done in how long."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        took = time.perf_counter() - self.t0
        if self.bar is None or self.total >= 1e9 or took >= 5:  # a short load leaves no line on a terminal
            self._line(f"{self.desc} done: {self._amount(self.done)} in {took:.1f} s")
        self.enabled = False

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is None:
            self.finish()
        elif self.bar is not None:
            self.bar.close()
        self.enabled = False
        return False
