"""`illada-mlx generate`: one prompt in, the reply streamed out (or one JSON object), stats on stderr."""

from __future__ import annotations

import json

import click

from ..errors import IlladaError
from ..files import read_json_file
from ..options import Command
from .common import (
    ending_on_signals,
    given_settings,
    load_or_convert_demo,
    ranks,
    sampler_options,
    stdin_prompt,
    templated_prompt,
    utf8_text,
)
from .widgets import Progress, compute_note, reply_json, stats_block, stream_reply

SCHEMA_HELP = (
    "A JSON schema file: the answer is JSON valid against it, the schema's skeleton written into the canvas "
    "and the model filling the values (docs/structured.md)."
)


@click.command("generate", cls=Command)
@click.option("--prompt", "-p", required=True, help="The prompt ('-' reads stdin); UTF-8 text.")
@click.option(
    "--system", "--system-prompt", "system", default=None, help="System text (merged into the first user turn)."
)
@click.option("--raw", "--ignore-chat-template", "raw", is_flag=True, help="No chat template (base models).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@click.option("--json-schema", "schema_path", default=None, help=SCHEMA_HELP)
@sampler_options
def command(prompt, system, raw, as_json, schema_path, model_path, mask_id, **kw):
    """Generate a reply to one prompt, streamed block by block; stats on stderr. SIGTERM or SIGHUP ends it
    with one line (`interrupted (signal N)`), even in the middle of a forward."""
    with ending_on_signals():
        kw["schema"] = read_json_file(schema_path, "--json-schema", 1 << 20) if schema_path else None
        generate_reply(prompt, system, raw, as_json, model_path, mask_id, **kw)


def generate_reply(prompt, system, raw, as_json, model_path, mask_id, **kw):
    """The generate command's work (signals handled by the caller)."""
    from .. import distributed as dist

    g = ranks()
    if prompt == "-" and g.size() > 1:
        raise IlladaError(
            "--prompt - does not work under mlx.launch (it never closes the ranks' stdin); pass the "
            "prompt as --prompt TEXT"
        )
    prompt = stdin_prompt() if prompt == "-" else utf8_text(prompt, "--prompt")
    system = utf8_text(system, "--system") if system else system
    model, tok = load_or_convert_demo(model_path, mask_id, group=g)
    kw["seed"] = dist.shared_seed(g, kw.get("seed"))
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    ids = templated_prompt(tok, msgs, raw=raw)
    schema = kw.pop("schema")
    if schema is not None:
        return print_json_answer(model, tok, ids, schema, given_settings(kw))
    r, text, tokens = stream_reply(model, tok, ids, given_settings(kw), Progress(), show_text=not as_json)
    if as_json:
        click.echo(json.dumps(reply_json(r, text, tokens, model)))
    else:
        click.echo()
        click.echo(stats_block(r, compute_note(model)), err=True)


def print_json_answer(model, tok, ids, schema, settings):
    from ..structured import generate_json

    r = generate_json(model, tok, ids, schema, **settings)
    click.echo(r.text)
    click.echo(f"Structured: {r.stats.nfe} forwards, {r.stats.processed} processed tokens ({r.spec.mode})", err=True)
