"""The scheduler: one worker thread owns the model and runs the queue a block at a time, one path for all:
compatible requests (batch.batch_key) share a `Batch` (a request joins at the next block boundary, its rows
leave when done, `max_batch` rows at most); any other runs as a `Solo` (runs.py) when no batch runs. Each
block's results become the same typed events (events.py). Several ranks: one Solo at a time, in lockstep.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Union

import mlx.core as mx
import numpy as np

from .. import distributed as dist
from ..api import ApiError
from ..batch import Batch, LogprobTracker, Row, batch_key
from ..config import one_line
from ..decode import Step
from ..engine import build_prompt
from ..structured import TemplateStep
from ..text import ReplyText
from .events import Choice, Failed, Finished, Job, Stepped, Text
from .openai_wire import logprob_entries
from .runs import Solo, Structured, settings_of, shared, stats_of
from .tool_runs import ToolRun

log = logging.getLogger("illada_mlx.server")
Run = Union[Batch, Solo, Structured, ToolRun]


class Scheduler:
    """The model, its tokenizer, the worker thread that serves the queue and a small pool that tokenizes."""

    def __init__(
        self,
        model,
        tokenizer,
        name: str,
        max_queue: int = 16,
        max_batch: int = 8,
        max_request_seconds: float = 600.0,
        group=None,
    ):
        self.model, self.tok, self.name = model, tokenizer, name
        self.group = group if group is not None and group.size() > 1 else None  # several ranks: lockstep
        self.max_batch = 1 if self.group is not None else max_batch
        self.max_request_seconds = max_request_seconds
        self.max_queue = max_queue
        self.jobs: queue.Queue = queue.Queue()  # submitted; the worker moves them to `waiting`
        self.waiting: deque = deque()
        self.queued: set = set()  # submitted and not yet taken by the worker (the queue limit counts the live ones)
        self.queue_lock = threading.Lock()
        self.served = 0  # requests ended, finished or cancelled
        self.cancelled = 0  # of them, those whose client went away first (no finish reported)
        self.late_steps: list[int] = []  # per row dropped mid-decode: 1 if the step it left after began after its
        # client had gone (it ran a whole step for nobody), else 0
        self.batch_sizes: list[int] = []  # rows in each batched block (reports and tests)
        self.created = int(time.time())
        self.pieces: dict[int, str] = {}  # token id -> its text alone, for step events
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="illada-tokenize")
        self.closing = threading.Event()  # set by close(): the running decode stops at its next block
        self.worker = threading.Thread(
            target=self._lockstep if self.group else self._work, daemon=True, name="illada-worker"
        )
        self.worker.start()

    def submit(self, job: Job):
        """Queue a job, or 429 when max_queue requests already wait (the running batch's not counted, nor the
        requests whose client went away while they waited: the worker skips them when it comes to them)."""
        job.deadline = time.monotonic() + self.max_request_seconds
        with self.queue_lock:
            self.queued = {j for j in self.queued if not j.cancel.is_set()}
            if len(self.queued) >= self.max_queue:
                raise ApiError(
                    429,
                    "the server is busy (request queue full); retry shortly",
                    code="queue_full",
                    kind="rate_limit_error",
                )
            self.queued.add(job)
        self.jobs.put_nowait(job)

    def queue_length(self) -> int:
        """Requests waiting whose client is still there."""
        with self.queue_lock:
            return sum(not j.cancel.is_set() for j in self.queued)

    def _take(self, job: Optional[Job]) -> Optional[Job]:
        """The worker takes a job off the queue (to decode it, or to skip it)."""
        with self.queue_lock:
            self.queued.discard(job)
        return job

    def encode(self, chat: bool, prompt) -> list[int]:
        if chat:
            return build_prompt(self.tok, prompt)
        return self.tok.encode(prompt, add_special_tokens=False)

    def _collect(self, wait: bool):
        if wait:
            self.waiting.append(self.jobs.get())
        while True:
            try:
                self.waiting.append(self.jobs.get_nowait())
            except queue.Empty:
                return

    # -------------------------------------------------------------------------------------- the worker
    def _work(self):
        """Requests in arrival order: the head of the queue joins the running batch at the next block when
        it is compatible and fits (rows, positions), else it waits for the batch to finish; a request that
        shares no batch runs alone (a Solo) when no batch runs."""
        run: Optional[Run] = None
        while True:
            self._collect(wait=run is None and not self.waiting)
            if run is None:
                job = self._take(self.waiting.popleft()) if self.waiting else None
                if job is None or job.cancel.is_set():
                    continue
                run = self._start(job)
            key = batch_key(run.spec) if shared(run) else None
            while self.waiting and (
                self.waiting[0].cancel.is_set()
                or (
                    key is not None
                    and self.waiting[0].schema is None
                    and self.waiting[0].tools is None
                    and batch_key(self.waiting[0].spec) == key
                    and run.size + self.waiting[0].n <= self.max_batch
                    and run.fits(len(self.waiting[0].prompt_ids), self.waiting[0].spec.max_tokens)
                )
            ):
                job = self._take(self.waiting.popleft())
                if not job.cancel.is_set():
                    self._admit(run, job)
            if not self._step(run):
                run = None

    def _lockstep(self):
        """Several ranks: requests one at a time in arrival order, each a Solo (which tells the other ranks
        what to run); at close() the other ranks are told to end (`follow` returns)."""
        while True:
            with dist.idle():  # no request may come for long: the watchdog waits
                job = self._take(self.jobs.get())
            if job is None:
                dist.broadcast(self.group, None)
                return
            if job.cancel.is_set() or self.closing.is_set():
                continue
            run = self._start(job)
            while self._step(run):
                pass

    def _start(self, job: Job) -> Run:
        group = self.group
        unbatched = group is not None or batch_key(job.spec) is None
        if job.tools is not None:
            run = ToolRun(self.model, self.tok, job.spec, job.tools, job.tool_choice)
        elif job.schema is not None:
            run = Structured(self.model, self.tok, job.spec, job.schema)
        elif unbatched:
            run = Solo(self.model, job.spec, group, self._halt)
        else:
            run = Batch(self.model, job.spec)
        self._admit(run, job)
        return run

    def _step(self, run: Run) -> bool:
        """Drop the rows that must go, run a block; whether rows are left. A failure (our bug) ends the run's
        requests with an error and the worker goes on (several ranks: the process exits, as the other ranks
        may be anywhere in the decode)."""
        try:
            self._drop(run)
            if run.size:
                self._block(run)
            return run.size > 0
        except Exception as e:
            log.exception("decode failed")
            rows = run.rows + run.joining
            for row in rows:
                row.handle.job.emit(Failed(row.handle.index, one_line(e) or type(e).__name__))
            for job in {id(r.handle.job): r.handle.job for r in rows}.values():
                self._ended(job)
            if self.group is not None:
                log.error("the ranks are out of step after a failed decode; exiting")
                logging.shutdown()
                os._exit(1)
            return False

    def close(self):
        """Several ranks: stop the running decode at its next block, drop the requests still queued, end the
        other ranks' `follow` and wait for the worker. One process: nothing (the worker is a daemon)."""
        if self.group is None or not self.worker.is_alive():
            return
        self.closing.set()
        self.jobs.put_nowait(None)
        self.worker.join()

    def _admit(self, run: Run, job: Job):
        for i in range(job.n):
            choice = Choice(job, i, ReplyText(self.tok, job.spec.stop))
            run.add(Row(choice, job.prompt_ids, job.spec.max_tokens, job.top_logprobs))

    def _halt(self, row: Row) -> Optional[str]:
        """Several ranks, at a block's end: whether the choice stops there, and why."""
        job = row.handle.job
        if job.cancel.is_set() or self.closing.is_set():
            return "cancelled"
        return "time_limit" if time.monotonic() > job.deadline else None

    def _drop(self, run: Run):
        """Rows of cancelled jobs leave; rows out of time end with "time_limit"."""
        now = time.monotonic()
        gone = {
            r.handle
            for r in run.rows + run.joining
            if r.handle.job.cancel.is_set() or self.closing.is_set() or now > r.handle.job.deadline
        }
        for row in run.remove(gone):
            if row.handle.job.cancel.is_set() or self.closing.is_set():
                if row.blocks and not shared(run):
                    log.info("request cancelled after block %d of %d", row.blocks, run.spec.n_blocks)
                self._done(row.handle)
            else:
                self._finish(run, row, [], "time_limit", None)

    def _block(self, run: Run):
        """One block of every row; its results as events."""
        rows = run.rows + run.joining
        ks = [r.top_logprobs for r in rows]
        tracker = LogprobTracker(max(ks)) if max(ks) >= 0 else None
        clock = [time.monotonic()] * 2  # when the step that just ran began, when it ended
        steps = any(r.handle.job.steps for r in rows)

        def on_step(ev: Union[Step, TemplateStep]):
            clock[:] = clock[1], time.monotonic()
            if steps:
                self._emit_steps(run, ev)

        if shared(run):
            self.batch_sizes.append(run.size)
        results = run.run_block(
            lambda r, t: r.handle.reply.add(t), tracker, on_step, leave=lambda r: self._gone(r.handle.job, clock[0])
        )  # a client gone: out now
        for row, toks, reason, lp in results:
            if reason == "cancelled":
                if shared(run):
                    log.info("a request's row left its batch mid-block (its client went away)")
                self._done(row.handle)
            else:
                self._finish(run, row, toks, reason, lp)

    def _finish(self, run: Run, row: Row, toks: list, reason: Optional[str], lp) -> None:
        """A block's tokens of a row as text; its finish when `reason` says it ended."""
        c = row.handle
        c.tokens += len(toks)
        call = run.call_of(row) if isinstance(run, ToolRun) else None  # a call is no text
        if reason is not None:
            c.reply.finish()
        text = c.reply.take()
        if (text or toks) and call is None:
            c.job.emit(Text(c.index, text, logprob_entries(self.tok, toks, lp, row.top_logprobs)))
        if reason is not None:
            stats, spec = stats_of(run, row, c.tokens), settings_of(run, row)
            c.job.emit(Finished(c.index, reason, c.tokens, stats, spec, call))
            self._done(c)

    def _gone(self, job: Job, began: float) -> bool:
        """Whether the job's client went away; if so, notes whether the step just run (begun at `began`)
        began after that (late_steps)."""
        if not job.cancel.is_set():
            return False
        self.late_steps.append(int(job.cancelled_at < began))
        return True

    def _done(self, c: Choice):
        """Count a request served (finished or cancelled) with its last choice, and cancelled when its
        client went away first."""
        if c.index == c.job.n - 1:
            self._ended(c.job)

    def _ended(self, job: Job):
        self.served += 1
        self.cancelled += job.cancel.is_set()

    def _emit_steps(self, run: Run, ev: Union[Step, TemplateStep]) -> None:
        """Each row that asked for them (diffusion.steps): its commits at this step as a Stepped event, the
        reply's block (its index, first position and length) and [position, token id, its text alone] per
        token committed, positions counted from the reply's start (canvas position run.lo is the block's)."""
        want = [(j, r) for j, r in enumerate(run.rows) if r.handle.job.steps]
        if not want:
            return
        if isinstance(ev, TemplateStep):
            return self._emit_template(want[0][1], ev)
        tokens = mx.take_along_axis(ev.canvas, ev.positions, axis=1)
        pos, committed, tokens = ev.positions.tolist(), ev.committed.tolist(), tokens.tolist()  # one host sync
        bl = run.spec.block_length
        for j, r in want:
            start = r.blocks * bl
            at = zip(pos[j], committed[j], tokens[j])
            commits = [[p - run.lo + start, t, self._piece(t)] for p, c, t in at if c]
            length = min(bl, r.budget - start)
            r.handle.job.emit(Stepped(r.handle.index, r.blocks, ev.step, start, length, commits))

    def _emit_template(self, r: Row, ev: TemplateStep) -> None:
        """A structured answer's step (runs.Structured: one block, the template's length): what the step
        filled as commits; at step 0 the template's fixed text too (`fixed`), so a client draws the skeleton
        before any value is filled."""
        ids = ev.answer.tolist()
        commits = [[p, ids[p], self._piece(ids[p])] for p in np.flatnonzero(ev.filled).tolist()]
        fixed = [[p, ids[p], self._piece(ids[p])] for p in np.flatnonzero(ev.fixed).tolist()] if ev.step == 0 else None
        r.handle.job.emit(Stepped(r.handle.index, 0, ev.step, 0, len(ids), commits, fixed))

    def _piece(self, t: int) -> str:
        if t not in self.pieces:
            self.pieces[t] = self.tok.decode([t])
        return self.pieces[t]
