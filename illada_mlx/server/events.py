"""What the scheduler tells a request's response, as typed events on the job's queue: text, a denoising
step's commits, a choice's finish, a failure. Job.emit takes only these; a reader meeting anything else
raises (`unknown`), so a mistyped event can never pass for a finish."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Optional, Union

from ..spec import DecodeSpec
from ..text import ReplyText
from ..tools import Tool, ToolCall


@dataclass(frozen=True)
class Text:
    """New text of choice `index` (a committed block's, or what a finish releases)."""

    index: int
    text: str
    logprobs: Optional[list] = None  # OpenAI's content entries for the block's tokens (openai_wire.logprob_entries)


@dataclass(frozen=True)
class Stepped:
    """A denoising step's commits in choice `index` (diffusion.steps): the reply's block (its index, first
    position and length) and [position, token id, its text alone] per token committed, positions counted
    from the reply's start. A structured answer's first event also lists its template's fixed text
    (`fixed`, in the same form): written before denoising, never committed by the model."""

    index: int
    block: int
    step: int
    start: int
    length: int
    commits: list
    fixed: Optional[list] = None

    def as_dict(self) -> dict:
        d = {
            "block": self.block,
            "step": self.step,
            "start": self.start,
            "length": self.length,
            "commits": self.commits,
        }
        if self.fixed is not None:
            d["fixed"] = self.fixed
        return d


@dataclass(frozen=True)
class Finished:
    """Choice `index` ended: why ("stop", "length", "time_limit", "tool_calls"), its tokens, its figures
    (None: none were measured), the settings it ran with, and its tool call when it made one."""

    index: int
    reason: str
    tokens: int
    stats: Optional[dict]
    spec: dict
    call: Optional[ToolCall] = None


@dataclass(frozen=True)
class Failed:
    """The decode failed (our bug): one line saying why."""

    index: int
    message: str


Event = Union[Text, Stepped, Finished, Failed]
EVENTS = (Text, Stepped, Finished, Failed)


def unknown(ev) -> TypeError:
    return TypeError(f"unknown server event {ev!r}")


@dataclass(eq=False)
class Job:
    """A request as the scheduler sees it: its prompt, its DecodeSpec, and the queue its events go to."""

    prompt_ids: list
    spec: DecodeSpec  # resolved and validated when the request came in
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue  # Event
    n: int = 1
    top_logprobs: int = -1  # -1: no log-probabilities
    steps: bool = False  # send a Stepped event per denoising step (diffusion.steps)
    cancel: threading.Event = field(default_factory=threading.Event)
    deadline: float = float("inf")  # time.monotonic() after which it ends with "time_limit"
    cancelled_at: float = float("inf")  # time.monotonic() when its client went away
    schema: Optional[dict] = None  # response_format's JSON schema: a Structured run fills its template
    tools: Optional[list[Tool]] = None  # tools it may call (tool_choice not "none"): a ToolRun answers it
    tool_choice: str = "auto"  # "auto", "required" or a tool's name (tools.choose_tool)

    def emit(self, ev: Event) -> None:
        if not isinstance(ev, EVENTS):
            raise unknown(ev)
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, ev)
        except RuntimeError:  # the server's event loop has closed (it stopped): nobody reads on
            self.stop()

    def stop(self) -> None:
        """Its client went away: the worker drops it at the step it is on."""
        self.cancelled_at = min(self.cancelled_at, time.monotonic())
        self.cancel.set()


@dataclass(eq=False)
class Choice:
    """One row of a job: its text so far."""

    job: Job
    index: int
    reply: ReplyText
    tokens: int = 0
