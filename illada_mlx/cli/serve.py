"""`illada-mlx serve`: the OpenAI-compatible HTTP server (illada_mlx.server) on a loaded model."""

from __future__ import annotations

import click

from ..options import Command
from .common import check_listen, load_or_convert_demo, ranks, shown

HOSTS_HELP = (
    "Comma list of Host header names accepted, or '*' for any (default: the bound host; localhost names on loopback)."
)
BATCH_HELP = "Rows decoded together (compatible requests join the running batch at block boundaries); 1 under mlx.launch with several ranks."
TIME_HELP = "A request running longer ends with finish_reason time_limit."
KEY_HELP = "Require Authorization: Bearer KEY (also from ILLADA_MLX_API_KEY)."
LEVELS = ["debug", "info", "warning", "error"]


@click.command("serve", cls=Command)
@click.option("--model", "model_path", default=None, help="MLX dir, HF dir or hub id (default: the demo model).")
@shown("--host", default="127.0.0.1", help="Bind address (localhost by default).")
@shown("--port", default=8080, type=click.IntRange(1, 65535))
@shown("--max-queue", default=16, type=click.IntRange(min=1), help="Requests waiting beyond this (at least 1) get 429.")
@shown("--max-batch", default=8, type=click.IntRange(1, 256), help=BATCH_HELP)
@shown("--max-request-seconds", default=600.0, type=click.FloatRange(min=0.1), help=TIME_HELP)
@click.option("--api-key", envvar="ILLADA_MLX_API_KEY", default=None, help=KEY_HELP)
@click.option("--allowed-hosts", default=None, help=HOSTS_HELP)
@click.option("--allowed-origins", default="", help="Comma list of origins allowed by CORS (default: none).")
@shown("--log-level", type=click.Choice(LEVELS), default="info", help="info: one line per request.")
@click.option("--mask-id", type=click.IntRange(min=0), default=None)
def command(model_path, host, port, max_queue, max_batch, max_request_seconds, api_key, allowed_hosts, **more):
    """OpenAI-compatible HTTP server: /v1/models, /v1/chat/completions, /v1/completions, /health.
    Under mlx.launch the model is split across the ranks (tensor parallel): rank 0 serves, one request at a
    time (no batching), and the other ranks run each decode with it."""
    import os
    from pathlib import Path

    from .. import distributed as dist
    from ..listen import check_api_key, host_names
    from ..server import Options, Scheduler, follow, serve

    g = ranks()
    if api_key is None and os.environ.get("ILLADA_MLX_API_KEY") == "":  # click reads an empty variable as unset
        api_key = ""
    api_key, hosts = check_api_key(api_key, "--api-key (or ILLADA_MLX_API_KEY)"), host_names(allowed_hosts)
    if dist.is_main(g):
        check_listen(host, port)
    allowed_origins, log_level, mask_id = more["allowed_origins"], more["log_level"], more["mask_id"]
    names = lambda v: tuple(x.strip().lower() for x in v.split(",") if x.strip()) if v else None  # noqa: E731
    model, tok = load_or_convert_demo(model_path, mask_id, group=g)
    if not dist.is_main(g):
        follow(model, tok, g)  # the same decodes as rank 0's, until its server stops
        return
    name = Path(str(model_path)).name if model_path else "illada-demo"
    scheduler = Scheduler(model, tok, name, max_queue, max_batch, max_request_seconds, group=g)
    opts = Options(api_key=api_key, allowed_hosts=hosts, allowed_origins=names(allowed_origins) or ())
    serve(scheduler, host, port, opts, log_level, echo=lambda m: click.echo(m, err=True))
