"""`illada-mlx eval`: lm-eval tasks, or two conversions against each other (illada_mlx.eval_suite)."""

from __future__ import annotations

import sys

import click

from ..options import SEED, Command, FiniteFloat
from ..spec import PRESETS
from .common import PARALLEL, load_or_convert_demo, ranks, shown

GREEDY_HELP = (
    "--tasks: also run the official greedy check (is_greedy) per request; multiple-choice metrics do not use "
    "it, and skipping it about halves their time."
)


@click.command("eval", cls=Command)
@click.option("--model", "model_path", default=None, help="Model for --tasks (default: the demo model).")
@click.option("--tasks", default=None, help="Comma list of lm-eval tasks (needs the `eval` extra).")
@click.option("--include-path", default=None, help="A folder of local lm-eval task YAMLs.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many documents per task.")
@click.option("--num-fewshot", type=click.IntRange(0, 1024), default=None)
@click.option("--apply-chat-template", is_flag=True, help="Put each task prompt through the chat template.")
@click.option("--compare", nargs=2, default=None, metavar="A B", help="Two model dirs to compare on --data.")
@click.option("--data", default=None, help='JSONL of {"prompt", "answer"} for --compare.')
@click.option("--raw", is_flag=True, help="--compare: prompts as they are, no chat template.")
@shown(
    "--mc-num",
    type=click.IntRange(1, 65536),
    default=128,
    help="Monte-Carlo samples per answer (a multiple of --batch-size).",
)
@shown("--batch-size", type=click.IntRange(1, 4096), default=32, help="Rows per forward (and mask group).")
@shown("--cfg-scale", type=FiniteFloat(min=0), default=0.0)
@shown("--seed", type=SEED, default=0, help="0 to 2**32-1.")
@shown("--greedy-check/--no-greedy-check", default=True, help=GREEDY_HELP)
@click.option("--mode", type=click.Choice(list(PRESETS)), default=None, help="Decoding mode for generation tasks.")
@click.option("--json", "json_out", default=None, help="Write the results JSON here.")
@PARALLEL
def command(json_out, **options):
    """Score a model: lm-eval tasks (--tasks), or two conversions against each other (--compare A B --data).
    Under mlx.launch rank 0 reports: --parallel data splits the requests across the ranks (the same scores
    as one process, in the same order), tensor splits the model."""
    from .. import distributed as dist
    from .. import eval_suite

    g = ranks()
    cfg = eval_suite.EvalConfig(**options)
    eval_suite.check(cfg, json_out)
    if cfg.compare:
        from tqdm import tqdm

        from ..evaluate import summary_line

        bar = tqdm(desc="comparing", unit="item", file=sys.stderr, disable=not sys.stderr.isatty())

        def progress(done: int, total: int):
            bar.total = total
            bar.update(done)

        with bar:
            r = eval_suite.run_compare(cfg, load_or_convert_demo, g, progress)
        click.echo(summary_line(r))
    else:
        from lm_eval.utils import make_table

        r = eval_suite.run_tasks(cfg, load_or_convert_demo, g)
        click.echo(make_table(r))
    if json_out and dist.is_main(g):
        eval_suite.save(json_out, r)
        click.echo(f"wrote {json_out}", err=True)
