"""`illada-mlx bench`: tokens/s, forwards and memory per decoding mode (illada_mlx.bench_suite), as a table."""

from __future__ import annotations

import click

from ..cache import CACHES, REFRESHES
from ..options import Command, IntList
from ..spec import PRESETS
from .common import PARALLEL, comma_names, load_or_convert_demo, mode_names, ranks, shown

OUTPUTS = {"json_out": "--json", "plot_out": "--plot"}  # option parameter -> its flag
SHAPE_HELP = "A random-weight model of this shape instead of a checkpoint (8b = iLLaDA-8B dims)."
GEN_HELP = "Comma list of budgets (with --shape every run writes the whole budget)."
PROMPT_HELP = "Comma list of prompt lengths (random tokens), or auto: demo prompts / 16,128."
REFRESH_HELP = f"Comma list of block refresh policies for the cached modes ({','.join(REFRESHES)})."
CACHES_HELP = f"Comma list of caches for the cached modes ({','.join(CACHES[1:])}; default: each mode's own)."


@click.command("bench", cls=Command)
@click.option("--model", "model_path", default=None, help="Model dir (default: the demo model, or --shape).")
@click.option("--shape", type=click.Choice(["tiny", "small", "8b"]), default=None, help=SHAPE_HELP)
@shown("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32")
@shown("--modes", default="exact,fast", help=f"Comma list of {','.join(PRESETS)}.")
@shown("--gen-length", "gen_lengths", type=IntList(), default="256", help=GEN_HELP)
@shown("--block-length", type=click.IntRange(min=1), default=32)
@shown("--prompt-lengths", type=IntList(allow_auto=True), default="auto", help=PROMPT_HELP)
@shown("--repeats", type=click.IntRange(min=1), default=1)
@shown("--refresh", "refreshes", default="drift", help=REFRESH_HELP)
@click.option("--caches", default="", help=CACHES_HELP)
@click.option("--baselines", default="", help="Comma list of torch,ar: the official PyTorch loop, mlx-lm AR.")
@click.option("--json", "json_out", default=None, help="Write the results JSON here.")
@click.option("--plot", "plot_out", default=None, help="Write a PNG here (needs matplotlib: the `plot` extra).")
@PARALLEL
def command(model_path, shape, dtype, modes, gen_lengths, block_length, prompt_lengths, repeats, refreshes, **more):
    """Tokens/s (to EOS), forwards, tokens per forward, processed tokens, memory, per mode, with baselines.
    The table goes to stdout, progress to stderr. Under mlx.launch rank 0 reports: --parallel data splits the
    runs across the ranks, tensor splits the model (every run on every rank, in lockstep)."""
    from .. import bench as B
    from .. import bench_suite
    from ..files import check_output_file, check_writable

    g = ranks()
    mode_list = mode_names(modes)
    out = {o: check_output_file(more[k], o) if more[k] is not None else None for k, o in OUTPUTS.items()}
    for option, path in out.items():
        if path is not None:
            check_writable(path, option)  # before the runs, not after them
    cfg = bench_suite.BenchConfig(
        mode_list,
        gen_lengths,
        model_path,
        shape,
        dtype,
        block_length,
        prompt_lengths,
        repeats,
        comma_names(refreshes, REFRESHES, "refresh policy"),
        comma_names(more["caches"], CACHES[1:], "cache") if more["caches"] else (None,),
        comma_names(more["baselines"], B.BASELINE_NEEDS, "baseline") if more["baselines"] else [],
        more["parallel"],
    )
    bench_suite.check(cfg, plot=bool(more["plot_out"]))
    result = bench_suite.run(cfg, load_or_convert_demo, g, log=lambda m: click.echo(m, err=True))
    if result is not None:
        bench_suite.save(result, out["--json"], out["--plot"])
        click.echo(B.table(result["runs"]))
