"""What the scheduler runs a block at a time: a `Batch` (batch.py: compatible requests' rows together) or
a `Solo`, a request that shares no batch (batch_key is None: a fixed canvas, CFG, the think boost, ...),
decoded as a batch of one row at a time with Batch's interface, so the scheduler drives both alike: add
rows, remove rows, run_block -> (row, its tokens, finish reason or None, its BlockLogprobs or None).

Why a Solo and not a Batch of one: Batch grows the canvas whole blocks at a time from one shared state and
does not do what makes a spec unbatchable. Measured on a random-weight tiny model (tests/fixtures
Spec(seed=31), "go", fast mode, blocks of 16, 64 tokens), a Batch of one against decode(): with the think
boost (100, 3) its tokens differ (Batch runs no boost); with a budget that is not whole blocks (40) it fails
(a block past the budget); a fixed canvas (exact mode) it cannot express. A Solo runs decode() itself, so a
lone request's tokens are decode()'s exactly (tests/test_server.py compares them), and the other ranks
(`follow`) run the same decode() in lockstep. Both share decode.denoise_block, and the scheduler turns
both's blocks into events by one path.

Under tensor parallelism (group) a Solo tells the other ranks what to decode before each choice (its token
ids and DecodeSpec, with a seed) and after each block whether to stop there (`halt`: a cancel, the time
limit, the server stopping); its running choice leaves only there.
"""

from __future__ import annotations

import logging
import signal
import time
from contextlib import closing
from dataclasses import replace
from typing import Callable, Optional

import mlx.core as mx

from .. import distributed as dist
from ..batch import Batch, BlockLogprobs, LogprobTracker, Row
from ..decode import BlockDone, Generation, Step, decode
from ..engine import stream_generate
from ..spec import DecodeSpec
from ..structured import generate_json

log = logging.getLogger("illada_mlx.server")


def choice_spec(spec: DecodeSpec, row: Row) -> DecodeSpec:
    """Choice i's settings: the request's, with seed + i when it has a seed."""
    return spec if spec.seed is None else replace(spec, seed=spec.seed + row.handle.index)


class Solo:
    """A request's choices one after another, each through decode() (seed + i for choice i)."""

    def __init__(self, model, spec: DecodeSpec, group=None, halt: Optional[Callable[[Row], Optional[str]]] = None):
        self.model, self.spec, self.group, self.halt = model, spec, group, halt
        self.rows: list[Row] = []  # the choice decoding now (one at most)
        self.joining: list[Row] = []  # the choices still to run, in order
        self.lo = 0  # the canvas position where the running block starts
        self.finished: dict[int, dict] = {}  # id(row) -> its decode's figures, once it finished
        self._events = None

    @property
    def size(self) -> int:
        return len(self.rows) + len(self.joining)

    def fits(self, prompt_len: int, budget: int) -> bool:
        return False  # nothing joins a request decoded alone

    def add(self, row: Row) -> None:
        self.joining.append(row)

    def remove(self, handles: set) -> list[Row]:
        """Take these rows out now; under several ranks the running one stays (it stops at its block's end,
        with the others: `halt`)."""
        live = self.group is None
        gone = [r for r in self.joining + (self.rows if live else []) if r.handle in handles]
        self.joining = [r for r in self.joining if r.handle not in handles]
        if live and self.rows and self.rows[0].handle in handles:
            self._end()
        return gone

    def run_block(self, stop_fn=None, logprobs: Optional[LogprobTracker] = None, on_step=None, leave=None) -> list:
        """One block of the running choice (the next one starts first when none runs); as Batch.run_block."""
        if not self.rows:
            self._begin(self.joining.pop(0), stop_fn)
        row, spec = self.rows[0], self.spec
        P = len(row.ids)
        for ev in self._events:
            if isinstance(ev, BlockDone):
                return [self._block_done(row, ev, logprobs)]
            if not isinstance(ev, Step):
                raise RuntimeError(f"decode gave {type(ev).__name__} before the block's end")
            if ev.step == 0:
                self.lo = P + ev.block * spec.block_length
                if logprobs is not None:
                    logprobs.start(1, self.lo, min(spec.block_length, P + spec.max_tokens - self.lo))
            if logprobs is not None:
                logprobs.step(ev)
            if on_step is not None:
                on_step(ev)
            if self.group is None and leave is not None and leave(row):  # one process: stop at this step
                log.info("request cancelled mid-block")
                self._end()
                return [(row, [], "cancelled", None)]
        raise RuntimeError("decode ended before its block did")

    def spec_for(self, row: Row) -> DecodeSpec:
        return choice_spec(self.spec, row)

    def _begin(self, row: Row, stop_fn) -> None:
        spec = self.spec_for(row)
        if self.group is not None:  # the other ranks' `follow` runs the same decode (one seed for sampling)
            spec = replace(spec, seed=spec.seed if spec.seed is not None else time.time_ns() % 2**31)
            dist.broadcast(self.group, {"ids": row.ids, "spec": spec.as_dict()})
        said = (lambda _, toks: stop_fn(row, toks)) if stop_fn is not None else None
        self._events = decode(self.model, [row.ids], spec, stop_fn=said)
        self.rows = [row]

    def _block_done(self, row: Row, ev: BlockDone, logprobs: Optional[LogprobTracker]) -> tuple:
        toks = ev.tokens[0]
        row.blocks += 1
        lp: Optional[BlockLogprobs] = logprobs.result().row(0, len(toks)) if logprobs is not None and toks else None
        last = ev.index == self.spec.n_blocks - 1 or (self.spec.growing and ev.finished[0])
        halted = self._decide(row)
        if halted or not last:
            if halted:
                self._end()
            return (row, toks, halted, lp)
        g = next(self._events)  # the Generation: no forward runs
        if not isinstance(g, Generation):
            raise RuntimeError("decode went on after its last block")
        halted = self._decide(row)
        self._end()
        if halted:
            return (row, toks, halted, lp)
        self.finished[id(row)] = g.stats.as_dict()
        return (row, toks, g.finish_reasons[0], lp)

    def _decide(self, row: Row) -> Optional[str]:
        """Several ranks: whether the choice stops here ("cancelled", "time_limit"), told to the others."""
        if self.group is None:
            return None
        why = self.halt(row) if self.halt is not None else None
        dist.decide(self.group, why is not None)
        if why == "cancelled":
            log.info("request cancelled after block %d of %d", row.blocks, self.spec.n_blocks)
        return why

    def _end(self) -> None:
        if self._events is not None:
            self._events.close()
        self._events, self.rows = None, []


class OneAtATime:
    """What a run whose choices start one at a time, joined by no other request (a template's, a tool
    request's), shares with Solo's interface: the choices waiting (`joining`), each one's figures
    (`finished`) and the spec it ran (`ran`). A subclass sets `rows` (the choices running)."""

    rows: list

    def __init__(self, spec: DecodeSpec):
        self.spec = spec
        self.joining: list[Row] = []
        self.lo = 0
        self.finished: dict[int, dict] = {}  # id(row) -> its figures
        self.ran: dict[int, DecodeSpec] = {}  # id(row) -> the spec it ran

    @property
    def size(self) -> int:
        return len(self.rows) + len(self.joining)

    def fits(self, prompt_len: int, budget: int) -> bool:
        return False  # nothing joins

    def add(self, row: Row) -> None:
        self.joining.append(row)

    def remove(self, handles: set) -> list[Row]:
        gone = [r for r in self.joining if r.handle in handles]
        self.joining = [r for r in self.joining if r.handle not in handles]
        return gone

    def spec_for(self, row: Row) -> DecodeSpec:
        return self.ran.get(id(row), choice_spec(self.spec, row))


class Structured(OneAtATime):
    """A request with a JSON schema (response_format): each choice's answer is one block, its template filled
    by structured.generate_json under the request's settings (seed + i for choice i)."""

    def __init__(self, model, tokenizer, spec: DecodeSpec, schema: dict):
        super().__init__(spec)
        self.model, self.tok, self.schema = model, tokenizer, schema
        self.rows: list[Row] = []

    def run_block(self, stop_fn=None, logprobs=None, on_step=None, leave=None) -> list:
        """The next choice's whole answer: (row, its tokens, "stop", None). When its request asks for steps,
        on_step gets the template's structured.TemplateStep events (the written skeleton, then each
        denoising step). The choice is in `rows` while it runs (a failure reaches its request)."""
        row = self.joining.pop(0)
        self.rows = [row]
        follow = on_step if on_step is not None and row.handle.job.steps else None
        r = generate_json(self.model, self.tok, row.ids, self.schema, spec=choice_spec(self.spec, row), on_step=follow)
        self.rows = []
        toks = self.tok.encode(r.text, add_special_tokens=False)
        if stop_fn is not None:
            stop_fn(row, toks)
        row.blocks += 1
        self.finished[id(row)] = {**r.stats.as_dict(), "output_tokens": len(toks)}
        self.ran[id(row)] = r.spec
        return [(row, toks, "stop", None)]


def stats_of(run, row: Row, tokens: int) -> Optional[dict]:
    """A choice's diffusion_stats. Alone: its decode's figures (None when it did not finish). Batched: what is
    measured per row (forwards while it was in the batch, its tokens, blocks, time); the figures a batch
    shares and does not split per row (the prompt's time and tokens/s, the tokens processed) are null
    rather than zeros; peak memory is the process's."""
    if not isinstance(run, Batch):  # Solo, Structured, tool_runs.ToolRun
        return run.finished.get(id(row))
    d = run.row_stats(row, tokens).as_dict()
    d.update(
        prompt_s=None,
        prompt_tps=None,
        processed=None,
        processed_per_output_token=None,
        peak_memory_bytes=mx.get_peak_memory(),
    )
    return d


def settings_of(run, row: Row) -> dict:
    """The settings a choice ran with (diffusion_settings)."""
    return (run.spec if isinstance(run, Batch) else run.spec_for(row)).as_dict()


def shared(run) -> bool:
    """Whether the run is a batch (the scheduler's batch_sizes count those)."""
    return isinstance(run, Batch)


def follow(model, tokenizer, group) -> None:
    """A rank other than 0 under `serve`: every decode rank 0's worker broadcasts, run in lockstep with it
    and stopped after the block where rank 0 says so, until rank 0 sends the end (its server stopped). It
    serves nothing and ignores Ctrl-C: rank 0 stops first and then ends this loop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        with dist.idle():  # as long as no request comes
            job = dist.broadcast(group)
        if job is None:
            return
        spec = DecodeSpec.from_dict(job["spec"])
        with closing(stream_generate(model, tokenizer, job["ids"], spec=spec)) as responses:
            for _ in responses:
                if dist.decide(group, False):
                    break
