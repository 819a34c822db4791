"""`illada-mlx serve`: an OpenAI-compatible HTTP API (Starlette + uvicorn).

Routes: POST /v1/chat/completions, POST /v1/completions (`stream: true`: server-sent events, one chunk
per committed block; with `diffusion.steps` a chunk per denoising step too), GET /v1/models,
/v1/models/{id}, /v1/illada/defaults (the decode settings per mode), /health, and the web chat page: GET /
and its two static files (web/).

One worker thread owns the model. Requests whose decode settings are compatible (batch.batch_key: the
same DecodeSpec apart from seed, stop strings and budget, on the growing canvas) share a batch: a request
joins the running batch at the next block boundary and its rows leave when they are done (`max_batch`
rows at most); any other request is decoded alone when the batch is empty. `n` choices are rows of one
batch. A client that disconnects cancels its request within a step: alone, its decode stops; batched, its
rows leave the batch at the next step and the other rows decode on unchanged; a request that runs past
`max_request_seconds` ends with finish_reason "time_limit".

A request is read and checked by api.py (limits, then field by field: a bad one gets one 400 naming the
field, never a 500) and resolved here into a Job (its DecodeSpec, made once by spec.make_spec). Diffusion
options go in a `diffusion` object (the openai client's `extra_body={"diffusion": {...}}`). listen.py
puts the guard (Host, API key, content type, the log line) in front and runs uvicorn with limits.

Tensor parallel (`mlx.launch`, several ranks; Engine(group=)): rank 0 serves HTTP and its worker decodes one
request at a time (no batching, n = 1), each through the engine: before a decode it broadcasts the prompt's
token ids and the DecodeSpec (with a seed: rank 0 draws one when the request has none), and after each
block one yes/no, whether to stop there (a cancel, the time limit, the server stopping). The other ranks
run `follow`: the same decode in lockstep, ending at the same block, until rank 0 sends the end. EOS and
stop strings end a decode inside the engine the same way on every rank (the same tokens, the same tokenizer).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import signal
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import mlx.core as mx
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import distributed as dist
from .api import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    ApiError,
    check_fields,
    choices,
    messages,
    parse_json,
    prompt_text,
    read_body,
    settings,
    step_events,
    streaming,
)
from .batch import Batch, LogprobTracker, Row, batch_key
from .config import ContextError, IlladaError, one_line
from .decode import Step
from .engine import build_prompt, stream_generate
from .listen import Guard, LoopErrors, Options, bind, exposure, make_server, raise_fd_limit
from .settings import as_json as settings_registry
from .spec import PRESETS, DecodeSpec, make_spec
from .text import ReplyText

log = logging.getLogger("illada_mlx.server")


# ------------------------------------------------------------------------------------------ the worker
class Cancelled(Exception):
    """The request decoded alone was cancelled (its client went away): it stops at the step it is on
    instead of its block's end."""


@dataclass(eq=False)
class Job:
    prompt_ids: list
    spec: DecodeSpec  # resolved and validated when the request came in
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue  # (kind, choice index, payload)
    n: int = 1
    top_logprobs: int = -1  # -1: no log-probabilities
    steps: bool = False  # send a "step" event per denoising step (diffusion.steps)
    cancel: threading.Event = field(default_factory=threading.Event)
    deadline: float = float("inf")  # time.monotonic() after which it ends with "time_limit"
    cancelled_at: float = float("inf")  # time.monotonic() when its client went away

    def emit(self, kind, index, payload=None):
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, (kind, index, payload))
        except RuntimeError:  # the server's event loop has closed (it stopped): nobody reads on
            self.stop()

    def stop(self):
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


class Engine:
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

    def _work(self):
        """Requests in arrival order: the head of the queue joins the running batch at the next block when
        it is compatible and fits (rows, positions), else it waits for the batch to finish; a request that
        shares no batch is decoded alone when no batch runs."""
        batch: Optional[Batch] = None
        while True:
            self._collect(wait=batch is None and not self.waiting)
            if batch is None:
                job = self._take(self.waiting.popleft()) if self.waiting else None
                if job is None or job.cancel.is_set():
                    continue
                if batch_key(job.spec) is None:
                    self._alone(job)
                    continue
                batch = Batch(self.model, job.spec)
                self._admit(batch, job)
            key = batch_key(batch.spec)
            while self.waiting and (
                self.waiting[0].cancel.is_set()
                or (
                    batch_key(self.waiting[0].spec) == key
                    and batch.size + self.waiting[0].n <= self.max_batch
                    and batch.fits(len(self.waiting[0].prompt_ids), self.waiting[0].spec.max_tokens)
                )
            ):
                job = self._take(self.waiting.popleft())
                if not job.cancel.is_set():
                    self._admit(batch, job)
            try:
                self._drop(batch)
                if batch.size:
                    self._block(batch)
            except Exception as e:  # our bug: the batch's requests get an error, the worker goes on
                log.exception("decode failed")
                for row in batch.rows + batch.joining:
                    row.handle.job.emit("error", row.handle.index, _one_line(e))
                batch = None
                continue
            if not batch.size:
                batch = None

    def _lockstep(self):
        """Several ranks: requests one at a time in arrival order, each through `_alone` (which tells the
        other ranks what to run); at close() the other ranks are told to end (`follow` returns)."""
        while True:
            with dist.idle():  # no request may come for long: the watchdog waits
                job = self._take(self.jobs.get())
            if job is None:
                dist.broadcast(self.group, None)
                return
            if not (job.cancel.is_set() or self.closing.is_set()):
                self._alone(job)

    def close(self):
        """Several ranks: stop the running decode at its next block, drop the requests still queued, end the
        other ranks' `follow` and wait for the worker. One process: nothing (the worker is a daemon)."""
        if self.group is None or not self.worker.is_alive():
            return
        self.closing.set()
        self.jobs.put_nowait(None)
        self.worker.join()

    def _collect(self, wait: bool):
        if wait:
            self.waiting.append(self.jobs.get())
        while True:
            try:
                self.waiting.append(self.jobs.get_nowait())
            except queue.Empty:
                return

    def _admit(self, batch: Batch, job: Job):
        for i in range(job.n):
            batch.add(
                Row(
                    Choice(job, i, ReplyText(self.tok, job.spec.stop)),
                    job.prompt_ids,
                    job.spec.max_tokens,
                    job.top_logprobs,
                )
            )

    def _drop(self, batch: Batch):
        """Rows of cancelled jobs leave; rows out of time end with "time_limit"."""
        now = time.monotonic()
        gone = {
            r.handle for r in batch.rows + batch.joining if r.handle.job.cancel.is_set() or now > r.handle.job.deadline
        }
        for row in batch.remove(gone):
            c = row.handle
            if not c.job.cancel.is_set():
                c.reply.finish()
                c.job.emit("text", c.index, (c.reply.take(), None))
                c.job.emit(
                    "done", c.index, self._info("time_limit", c.tokens, _row_stats(batch, row, c.tokens), batch.spec)
                )
            self._done(c)

    def _block(self, batch: Batch):
        ks = [r.top_logprobs for r in batch.rows + batch.joining]
        tracker = LogprobTracker(max(ks)) if max(ks) >= 0 else None
        bl = batch.spec.block_length

        clock = [time.monotonic()] * 2  # when the step that just ran began, when it ended

        def on_step(ev):
            clock[:] = clock[1], time.monotonic()
            if not steps:
                return
            want = [(j, r) for j, r in enumerate(batch.rows) if r.handle.job.steps]
            got = self._step_tokens(ev) if want else None
            for j, r in want:
                self._emit_step(r.handle.job, r.handle.index, ev, got, j, r.blocks, r.blocks * bl, bl, batch.lo)

        steps = any(r.handle.job.steps for r in batch.rows + batch.joining)
        self.batch_sizes.append(batch.size)
        blocks = batch.run_block(
            lambda r, t: r.handle.reply.add(t), tracker, on_step, leave=lambda r: self._gone(r.handle.job, clock[0])
        )  # a client gone: out now
        for row, toks, reason, lp in blocks:
            c = row.handle
            if reason == "cancelled":
                log.info("a request's row left its batch mid-block (its client went away)")
                self._done(c)
                continue
            c.tokens += len(toks)
            if reason is not None:
                c.reply.finish()
            text = c.reply.take()
            if text or toks:
                c.job.emit("text", c.index, (text, self._logprobs(toks, lp, row.top_logprobs)))
            if reason is not None:
                c.job.emit("done", c.index, self._info(reason, c.tokens, _row_stats(batch, row, c.tokens), batch.spec))
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

    def _alone(self, job: Job):
        """A request that shares no batch: its choices one after another through the engine."""
        try:
            for i in range(job.n):
                spec = job.spec if job.spec.seed is None else replace(job.spec, seed=job.spec.seed + i)
                if not self._alone_choice(job, i, spec):
                    break
        except Exception as e:  # our bug: this request gets an error, the worker goes on
            log.exception("decode failed")
            job.emit("error", 0, _one_line(e))
            if self.group is not None:  # the other ranks may be anywhere in the decode: no way back to lockstep
                log.error("the ranks are out of step after a failed decode; exiting")
                logging.shutdown()
                os._exit(1)
        self._ended(job)

    def _alone_choice(self, job: Job, i: int, spec: DecodeSpec) -> bool:
        P, bl, end = len(job.prompt_ids), spec.block_length, len(job.prompt_ids) + spec.max_tokens
        tracker = LogprobTracker(job.top_logprobs) if job.top_logprobs >= 0 else None
        clock = [time.monotonic()]  # when the step now ending began

        def on_step(ev):
            began, clock[0] = clock[0], time.monotonic()
            if self.group is None and self._gone(job, began):  # one process: stop at this step (ranks: in step)
                raise Cancelled
            if tracker is not None:
                if ev.step == 0:
                    lo = P + ev.block * bl
                    tracker.start(1, lo, min(bl, end - lo))
                tracker.step(ev)
            if job.steps:
                start = ev.block * bl
                self._emit_step(
                    job, i, ev, self._step_tokens(ev), 0, ev.block, start, min(bl, end - P - start), P + start
                )

        run = spec
        if self.group is not None:  # the other ranks' `follow` runs the same decode (one seed for sampling)
            run = replace(spec, seed=spec.seed if spec.seed is not None else time.time_ns() % 2**31)
            dist.broadcast(self.group, {"ids": job.prompt_ids, "spec": run.as_dict()})
        try:
            return self._decode_choice(job, i, spec, run, on_step, tracker)
        except Cancelled:
            log.info("request cancelled mid-block")
            return False

    def _decode_choice(self, job: Job, i: int, spec: DecodeSpec, run: DecodeSpec, on_step, tracker) -> bool:
        """Choice i through the engine, a message per block; False when it ended early (cancel, time)."""
        tokens, r = 0, None
        for r in stream_generate(self.model, self.tok, job.prompt_ids, spec=run, on_step=on_step):
            tokens += len(r.tokens)
            lp = tracker.result() if tracker is not None and r.tokens else None
            if r.text or r.tokens:
                job.emit(
                    "text", i, (r.text, self._logprobs(r.tokens, lp and lp.row(0, len(r.tokens)), job.top_logprobs))
                )
            cancelled = job.cancel.is_set() or self.closing.is_set()
            late = r.finish_reason is None and time.monotonic() > job.deadline
            if self.group is not None:
                dist.decide(self.group, cancelled or late)  # the other ranks stop after this block too
            if cancelled:
                log.info("request cancelled after block %d of %d", r.blocks_done, r.blocks)
                return False
            if late:
                job.emit("done", i, self._info("time_limit", tokens, None, spec))
                return False
        job.emit("done", i, self._info(r.finish_reason, tokens, r.stats, spec))
        return True

    @staticmethod
    def _step_tokens(ev: Step) -> tuple[list, list, list]:
        """A Step's positions, committed flags and the tokens there, as lists (rows, K): one host sync."""
        tokens = mx.take_along_axis(ev.canvas, ev.positions, axis=1)
        return ev.positions.tolist(), ev.committed.tolist(), tokens.tolist()

    def _emit_step(
        self, job: Job, index: int, ev: Step, got: tuple, j: int, block: int, start: int, length: int, lo: int
    ):
        """Row j's commits at a step as a "step" event: the reply's block (its index, its first position and
        length) and [position, token id, its text alone] per token committed, positions counted from the
        reply's start (canvas position lo is reply position start)."""
        pos, committed, tokens = got
        commits = [[p - lo + start, t, self._piece(t)] for p, c, t in zip(pos[j], committed[j], tokens[j]) if c]
        job.emit("step", index, {"block": block, "step": ev.step, "start": start, "length": length, "commits": commits})

    def _piece(self, t: int) -> str:
        if t not in self.pieces:
            self.pieces[t] = self.tok.decode([t])
        return self.pieces[t]

    @staticmethod
    def _info(reason, tokens, stats, spec) -> dict:
        stats = stats if stats is None or isinstance(stats, dict) else stats.as_dict()
        return {"finish_reason": reason, "completion_tokens": tokens, "stats": stats, "spec": spec.as_dict()}

    def _logprobs(self, toks, lp, k) -> Optional[list]:
        """OpenAI's logprobs content entries for a block's tokens."""
        if lp is None or k < 0:
            return None

        def entry(t, v):
            s = self.tok.decode([t])
            return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8", "replace"))}

        out = []
        for j, t in enumerate(toks):
            e = entry(t, lp.token[j])
            e["top_logprobs"] = [entry(a, v) for a, v in zip(lp.top_ids[j], lp.top[j])][:k] if k else []
            out.append(e)
        return out


def _row_stats(batch: Batch, row: Row, tokens: int) -> dict:
    """A batched row's diffusion_stats: what is measured per row (forwards while it was in the batch, its
    tokens, blocks, time); the figures a batch shares and does not split per row (the prompt's time and
    tokens/s, the tokens processed) are null rather than zeros; peak memory is the process's."""
    d = batch.row_stats(row, tokens).as_dict()
    d.update(
        prompt_s=None,
        prompt_tps=None,
        processed=None,
        processed_per_output_token=None,
        peak_memory_bytes=mx.get_peak_memory(),
    )
    return d


def _one_line(e: Exception) -> str:
    return one_line(e) or type(e).__name__


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


# ------------------------------------------------------------------------------------------ reading a request
async def _request(request: Request, chat: bool):
    """(job, body, stream, include_usage) for a request, or ApiError."""
    engine: Engine = request.app.state.engine
    opts: Options = request.app.state.opts
    body = parse_json(await read_body(request, opts.max_body, opts.body_seconds))
    check_fields(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    if body.get("model") is not None and not isinstance(body["model"], str):
        raise ApiError(400, "model must be a string", param="model")
    s = settings(engine.model.args, body)
    n, top = choices(body, chat, engine.max_batch)
    stream, include_usage = streaming(body)
    steps = step_events(body, stream)
    prompt = messages(body) if chat else prompt_text(body)
    chars = sum(len(m["content"]) for m in prompt) if chat else len(prompt)
    limit = opts.max_prompt_chars or 16 * engine.model.args.max_position_embeddings
    if chars > limit:
        raise ApiError(
            400,
            f"the prompt has {chars} characters, more than this server takes ({limit})",
            param="messages" if chat else "prompt",
            code="context_length_exceeded",
        )
    ids = await asyncio.get_running_loop().run_in_executor(engine.pool, engine.encode, chat, prompt)
    try:
        spec = make_spec(engine.model, engine.tok, len(ids), **s)
    except ContextError as e:
        raise ApiError(400, str(e), param="messages" if chat else "prompt", code="context_length_exceeded")
    except IlladaError as e:
        raise ApiError(400, str(e))
    bl = spec.block_length
    if s["max_tokens"] is None and spec.growing and spec.max_tokens > bl:  # whole blocks: it can batch
        spec = replace(spec, max_tokens=spec.max_tokens - spec.max_tokens % bl)
    job = Job(ids, spec, asyncio.get_running_loop(), asyncio.Queue(), n=n, top_logprobs=top, steps=steps)
    return job, stream, include_usage


# ------------------------------------------------------------------------------------------ answering
async def _serve(request: Request, chat: bool):
    engine: Engine = request.app.state.engine
    try:
        job, stream, include_usage = await _request(request, chat)
        engine.submit(job)
    except ApiError as e:
        return e.response()
    answer = Answer(chat, engine.name, len(job.prompt_ids), include_usage)
    if stream:
        return StreamingResponse(answer.events(job, request), media_type="text/event-stream")
    return await answer.reply(job, request)


class Answer:
    """A request's response in OpenAI's shapes: one JSON object, or server-sent chunks."""

    def __init__(self, chat: bool, model: str, prompt_tokens: int, include_usage: bool):
        self.chat, self.model, self.P, self.include_usage = chat, model, prompt_tokens, include_usage
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.offsets: dict[int, int] = {}  # choice -> characters of its tokens so far (text_offset)

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self, tokens: int) -> dict:
        return {"prompt_tokens": self.P, "completion_tokens": tokens, "total_tokens": self.P + tokens}

    def logprobs(self, entries: Optional[list], i: int = 0) -> Optional[dict]:
        """Chat: {"content": entries}. Completions: the legacy lists; text_offset is each token's character
        offset in choice i's text, counted on across a stream's chunks."""
        if entries is None:
            return None
        if self.chat:
            return {"content": entries}
        offsets, at = [], self.offsets.get(i, 0)
        for e in entries:
            offsets.append(at)
            at += len(e["token"])
        self.offsets[i] = at
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets,
        }

    def chunk(self, i: int, text=None, lp=None, finish=None, first=False, extra=None) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
            choice = {"index": i, "delta": delta, "logprobs": self.logprobs(lp, i), "finish_reason": finish}
        else:
            choice = {"index": i, "text": text or "", "logprobs": self.logprobs(lp, i), "finish_reason": finish}
        c = {**self.head(self.object + ".chunk" if self.chat else self.object), "choices": [choice]}
        if self.include_usage:
            c["usage"] = None
        if extra:
            c.update(extra)
        return f"data: {json.dumps(c)}\n\n"

    async def events(self, job: Job, request: Request):
        """The stream: the role (chat), text chunks as blocks commit, each choice's finish, the usage if
        asked for, [DONE]. With diffusion.steps, a chunk per denoising step before its block's text (an
        empty delta and a `diffusion` field) and the finish chunk carries diffusion_stats and
        diffusion_settings. Leaving early (a disconnect) cancels the job."""
        tokens, done = 0, 0
        try:
            if self.chat:
                for i in range(job.n):
                    yield self.chunk(i, first=True)
            while done < job.n:
                kind, i, payload = await job.out.get()
                if kind == "text":
                    yield self.chunk(i, payload[0], payload[1])
                elif kind == "step":
                    yield self.chunk(i, extra={"diffusion": payload})
                elif kind == "error":
                    yield f"data: {json.dumps({'error': {'message': payload, 'type': 'server_error'}})}\n\n"
                    break
                else:
                    tokens += payload["completion_tokens"]
                    done += 1
                    extra = {"diffusion_stats": payload["stats"], "diffusion_settings": payload["spec"]}
                    yield self.chunk(i, finish=payload["finish_reason"], extra=extra if job.steps else None)
            if self.include_usage:
                last = {
                    **self.head(self.object + ".chunk" if self.chat else self.object),
                    "choices": [],
                    "usage": self.usage(tokens),
                }
                yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"
            request.state.tokens = (self.P, tokens)
        finally:
            if done < job.n:
                job.stop()  # the worker drops its rows at the step it is on

    async def reply(self, job: Job, request: Request) -> Response:
        """The whole response once every choice is done; a client gone meanwhile cancels the job."""
        texts, lps, infos = [[] for _ in range(job.n)], [None] * job.n, [None] * job.n
        while sum(x is not None for x in infos) < job.n:
            try:
                kind, i, payload = await asyncio.wait_for(job.out.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.stop()
                    log.info("client disconnected: %s cancelled", self.id)
                    return Response(status_code=499)
                continue
            if kind == "text":
                texts[i].append(payload[0])
                if payload[1] is not None:
                    lps[i] = (lps[i] or []) + payload[1]
            elif kind == "done":
                infos[i] = payload
            else:
                job.stop()
                return ApiError(500, payload, kind="server_error").response()
        out = []
        for i in range(job.n):
            c = {
                "index": i,
                "finish_reason": infos[i]["finish_reason"],
                "logprobs": self.logprobs(lps[i] if job.top_logprobs >= 0 else None, i),
            }
            if self.chat:
                c["message"] = {"role": "assistant", "content": "".join(texts[i])}
            else:
                c["text"] = "".join(texts[i])
            out.append(c)
        tokens = sum(x["completion_tokens"] for x in infos)
        request.state.tokens = (self.P, tokens)
        return JSONResponse(
            {
                **self.head(self.object),
                "choices": out,
                "usage": self.usage(tokens),
                "diffusion_stats": infos[0]["stats"],
                "diffusion_settings": infos[0]["spec"],
            }
        )


async def chat_completions(request):
    return await _serve(request, chat=True)


async def completions(request):
    return await _serve(request, chat=False)


def _model_card(e: Engine) -> dict:
    return {"id": e.name, "object": "model", "created": e.created, "owned_by": "illada-mlx"}


async def models(request):
    return JSONResponse({"object": "list", "data": [_model_card(request.app.state.engine)]})


async def model(request):
    e: Engine = request.app.state.engine
    if request.path_params["name"] != e.name:
        return ApiError(
            404,
            f"no model {request.path_params['name']!r}; this server has {e.name!r}",
            param="model",
            code="model_not_found",
        ).response()
    return JSONResponse(_model_card(e))


async def defaults(request):
    """What a request without diffusion options gets, per mode (the web page's settings panel): the
    default mode and each mode's block length, steps per block, commit rule, threshold, budget
    (max_tokens, before it is cut to the room a prompt leaves), temperature, cache and block refresh; and the
    ids that end
    a reply (EOS, EoT), which the page draws apart on the canvas; and the registry of settings (settings.py:
    each one's type, range or choices, help and where a request carries it)."""
    e: Engine = request.app.state.engine
    shown = (
        "block_length",
        "steps_per_block",
        "rule",
        "threshold",
        "error_bound",
        "max_tokens",
        "temperature",
        "cache",
        "block_refresh",
        "drift_threshold",
    )
    modes = {}
    for name in PRESETS:
        spec = make_spec(e.model, e.tok, 0, mode=name, default_cap=512)
        modes[name] = {k: getattr(spec, k) for k in shown}
    spec = make_spec(e.model, e.tok, 0)
    ends = [t for t in (spec.eos_id, spec.eot_id) if t is not None]
    return JSONResponse(
        {"model": e.name, "mode": spec.mode, "modes": modes, "end_tokens": ends, "settings": settings_registry()}
    )


async def health(request):
    e: Engine = request.app.state.engine
    return JSONResponse({"status": "ok", "model": e.name, "queued": e.queue_length()})


# ------------------------------------------------------------------------------------------ the web chat page
WEB = Path(__file__).parent / "web"
STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}  # all it serves
PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "cache-control": "no-cache",
}


async def page(request):
    return Response((WEB / "index.html").read_bytes(), media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


async def static(request):
    """One of the page's files, by name from the fixed list (no path is ever built from anything else)."""
    name = request.path_params["name"]
    if name not in STATIC:
        return ApiError(404, f"no route {request.url.path}", code="not_found").response()
    return Response((WEB / name).read_bytes(), media_type=STATIC[name], headers=PAGE_HEADERS)


async def favicon(request):
    """The page's icon (also what a browser asks for by itself), so that no page load logs a 404."""
    return Response(
        (WEB / "favicon.svg").read_bytes(),
        media_type="image/svg+xml",
        headers={**PAGE_HEADERS, "cache-control": "max-age=86400"},
    )


async def not_found(request, exc):
    return ApiError(404, f"no route {request.url.path}", code="not_found").response()


async def method_not_allowed(request, exc):
    return ApiError(405, f"method {request.method} not allowed on {request.url.path}").response()


async def server_error(request, exc):
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return ApiError(500, "internal error", kind="server_error").response()


def make_app(engine: Engine, opts: Optional[Options] = None):
    opts = opts or Options()

    @asynccontextmanager
    async def lifespan(app):
        asyncio.get_running_loop().set_exception_handler(LoopErrors())  # an fd-limit burst: one line
        yield
        await asyncio.to_thread(engine.close)  # several ranks: the others end when the server stops

    app = Starlette(
        lifespan=lifespan,
        routes=[
            Route("/", page, methods=["GET"]),
            Route("/static/{name}", static, methods=["GET"]),
            Route("/favicon.ico", favicon, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/v1/illada/defaults", defaults, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{name:path}", model, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
        ],
        exception_handlers={404: not_found, 405: method_not_allowed, 500: server_error},
    )
    app.state.engine, app.state.opts = engine, opts
    guarded = Guard(app, opts)
    if opts.allowed_origins:
        return CORSMiddleware(
            guarded,
            allow_origins=list(opts.allowed_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type"],
        )
    return guarded


def serve(
    engine: Engine,
    host: str,
    port: int,
    opts: Options,
    log_level: str = "info",
    max_connections: int = 256,
    idle_seconds: float = 10.0,
    echo=print,
) -> None:
    """Bind, say where, serve until interrupted."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s")
    log.setLevel(log_level.upper())
    raise_fd_limit(max_connections)
    sock = bind(host, port)
    for line in exposure(host, opts):
        echo(line)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{sock.getsockname()[1]}"
    ranks = f"; tensor parallel over {engine.group.size()} ranks: one request at a time" if engine.group else ""
    echo(f"serving {engine.name} on {url}/v1; web chat on {url}/{ranks}")
    server = make_server(
        make_app(engine, opts),
        host,
        port,
        log_level if log_level != "info" else "warning",
        max_connections,
        idle_seconds,
    )
    server.run(sockets=[sock])
