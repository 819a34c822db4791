"""A reply's text, grown block by block with mlx-lm's streaming detokenizer and cut at stop strings.

Each token goes through the detokenizer once, so the decoding work is linear in the reply's length; a
stop string is looked for only in the text that a block added (plus the longest stop's length before it).
"""

from __future__ import annotations

from typing import Sequence


class ReplyText:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.detok = tokenizer.detokenizer  # a fresh streaming detokenizer per reply
        self.stop = tuple(s for s in stop if s)
        self.longest = max((len(s) for s in self.stop), default=0)
        self.cut = None  # index of the first stop string in the text, once one has appeared
        self.sent = 0  # characters handed out by take()
        self.final = False

    def add(self, tokens: list[int]) -> bool:
        """Append a block's tokens; True once a stop string has appeared."""
        before = len(self.detok.text)
        for t in tokens:
            self.detok.add_token(t)
        if self.stop and self.cut is None:
            self._find(max(0, before - self.longest))
        return self.cut is not None

    def _find(self, start: int) -> None:
        text = self.detok.text
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        self.cut = min(hits) if hits else None

    def finish(self) -> str:
        """Flush the detokenizer (the reply is complete) and return the whole text."""
        if not self.final:
            before = len(self.detok.text)
            self.detok.finalize()
            self.final = True
            if self.stop and self.cut is None:
                self._find(max(0, before - self.longest))
        return self.text

    @property
    def text(self) -> str:
        t = self.detok.text
        return t if self.cut is None else t[: self.cut]

    def take(self) -> str:
        """The text not handed out yet. Until the reply is final, a tail that could be the start of a stop
        string is held back."""
        t = self.text
        end = len(t)
        if self.cut is None and not self.final:
            end -= _partial_stop(t, self.stop, self.longest)
        new = t[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return new


def _partial_stop(text: str, stop: tuple, longest: int) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    for k in range(min(longest - 1, len(text)), 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stop):
            return k
    return 0
