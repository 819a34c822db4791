"""`illada-mlx serve`: an OpenAI-compatible HTTP API (Starlette + uvicorn).

Routes: POST /v1/chat/completions, POST /v1/completions (`stream: true`: server-sent events, one chunk
per committed block; with `diffusion.steps` a chunk per denoising step too), GET /v1/models,
/v1/models/{id}, /v1/illada/defaults (the decode settings per mode), /health, and the web chat page: GET /
and its two static files (web/).

The package:
  - scheduler.py: `Scheduler`, the worker thread that owns the model and runs every request a block at a
    time through one path: compatible requests (batch.batch_key: the same DecodeSpec apart from seed, stop
    strings and budget, on the growing canvas) share a Batch, any other runs alone (runs.py's Solo, with
    Batch's interface); `n` choices are rows. A client that disconnects cancels its request within a
    step; a request that runs past `max_request_seconds` ends with finish_reason "time_limit".
  - events.py: the Job (one request: its DecodeSpec, made once by spec.make_spec) and the typed events the
    scheduler sends it (Text, Stepped, Finished, Failed).
  - openai_wire.py: those events in OpenAI's shapes (chunks, whole responses, logprobs).
  - routes.py: reading a request (api.py checks it: a bad field gets one 400 naming it, never a 500), the
    routes, the web page, the app (listen.py's guard in front: Host, API key, content type, the log
    line) and `serve`.
  - runs.py: Solo, Structured (response_format's JSON schema), and `follow` for the ranks other than 0.
  - tool_runs.py: ToolRun, a request with tools: the decision (tools.choose_tool), then the call's template
    filled whole (finish_reason "tool_calls"), or, when auto decides not to call, a Solo's free-form answer.

Tensor parallel (`mlx.launch`, several ranks; Scheduler(group=)): rank 0 serves HTTP and its worker decodes
one request at a time (no batching, n = 1): before a decode it broadcasts the prompt's token ids and the
DecodeSpec (with a seed: rank 0 draws one when the request has none), and after each block one yes/no,
whether to stop there (a cancel, the time limit, the server stopping). The other ranks run `follow`: the
same decode in lockstep, ending at the same block, until rank 0 sends the end. EOS and stop strings end a
decode inside the engine the same way on every rank (the same tokens, the same tokenizer).
"""

from ..listen import Options, bind, exposure, make_server
from .events import Choice, Event, Failed, Finished, Job, Stepped, Text
from .routes import make_app, serve
from .runs import Solo, follow
from .scheduler import Scheduler

__all__ = [
    "Choice",
    "Event",
    "Failed",
    "Finished",
    "Job",
    "Options",
    "Scheduler",
    "Solo",
    "Stepped",
    "Text",
    "bind",
    "exposure",
    "follow",
    "make_app",
    "make_server",
    "serve",
]
