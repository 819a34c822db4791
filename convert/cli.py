"""The `convert` command (`convert_command`), added to `illada-mlx` by the command line's composition root."""

from __future__ import annotations

import click

from illada_mlx.config import IlladaError
from illada_mlx.options import Command, FiniteFloat
from illada_mlx.quant import QUANT_MODES, RECIPES, check_params

from .card import format_size
from .converter import DTYPES, convert

BITS = sorted({b for bits, _ in QUANT_MODES.values() for b in bits})
GROUP_SIZES = sorted({g for _, groups in QUANT_MODES.values() for g in groups})


def _q_mode_defaults(key: str) -> str:
    return ", ".join(f"{q_mode} {check_params(None, None, q_mode)[key]}" for q_mode in QUANT_MODES)


def _quantize_flags(quantize, q_bits, q_group_size, q_mode, q_recipe) -> bool:
    """Whether to quantize: -q, or a recipe (which quantizes: said in one line); a bit width, group size or
    mode without either would be ignored, so it is refused."""
    if q_recipe and not quantize:
        click.echo(f"note: --q-recipe {q_recipe} quantizes the model (-q implied)", err=True)
        return True
    given = [f for f, v in (("--q-bits", q_bits), ("--q-group-size", q_group_size)) if v] + (
        ["--q-mode"] if q_mode != "affine" else []
    )
    if given and not quantize:
        raise IlladaError(f"{given[0]} takes effect only when quantizing; add -q (or --q-recipe)")
    return quantize


@click.command("convert", cls=Command)
@click.option("--hf-path", required=True, help="Source: a local HF checkpoint dir or a hub repo id.")
@click.option(
    "--mlx-path",
    default="mlx_model",
    show_default=True,
    help="Destination MLX model dir (written atomically; mlx-lm's default name).",
)
@click.option(
    "--dtype",
    type=click.Choice(list(DTYPES)),
    default=None,
    help="Cast float tensors (default: keep the checkpoint's dtype).",
)
@click.option("-q", "--quantize", is_flag=True, help="Quantize linear layers and the embedding.")
@click.option(
    "--q-bits",
    type=click.Choice([str(b) for b in BITS]),
    default=None,
    help=f"Default: the mode's ({_q_mode_defaults('bits')}).",
)
@click.option(
    "--q-group-size",
    type=click.Choice([str(g) for g in GROUP_SIZES]),
    default=None,
    help=f"Default: the mode's ({_q_mode_defaults('group_size')}).",
)
@click.option("--q-mode", type=click.Choice(list(QUANT_MODES)), default="affine", show_default=True)
@click.option(
    "--q-recipe",
    "--quant-predicate",
    "q_recipe",
    type=click.Choice(list(RECIPES)),
    default=None,
    help="Mixed precision: body bits_embedding/head bits (3/2-bit recipes also keep sensitive layers at 6).",
)
@click.option("--mask-id", type=click.IntRange(min=0), default=None, help="Override the mask token id (iLLaDA: 5).")
@click.option(
    "--max-shard-size",
    type=FiniteFloat(0, 1024, min_open=True),
    default=2.0,
    show_default=True,
    help="Output shard size in GB (10^9 bytes).",
)
@click.option("--force", is_flag=True, help="Replace a destination that holds a converted model.")
@click.option("--allow-nonfinite", is_flag=True, help="Convert weights holding NaN / infinity (refused by default).")
@click.option("--upload-repo", default=None, help="After converting, upload the directory to this hub repo.")
def convert_command(
    hf_path,
    mlx_path,
    dtype,
    quantize,
    q_bits,
    q_group_size,
    q_mode,
    q_recipe,
    mask_id,
    max_shard_size,
    force,
    allow_nonfinite,
    upload_repo,
):
    """Convert an HF checkpoint (iLLaDA or LLaDA layout) into an MLX model directory."""
    quantize = _quantize_flags(quantize, q_bits, q_group_size, q_mode, q_recipe)
    s = convert(
        hf_path,
        mlx_path,
        dtype=dtype,
        quantize=quantize,
        q_bits=int(q_bits) if q_bits else None,
        q_group_size=int(q_group_size) if q_group_size else None,
        q_mode=q_mode,
        q_recipe=q_recipe,
        mask_id=mask_id,
        force=force,
        max_shard_bytes=max(1, int(max_shard_size * 1e9)),
        upload_repo=upload_repo,
        allow_nonfinite=allow_nonfinite,
    )
    click.echo(
        f"wrote {s['path']} ({s['layout']} layout, {s['output_shards']} shard(s), "
        f"{format_size(s['output_bytes'])}, {s['bits_per_weight']:.3f} bits per weight) "
        f"from {format_size(s['source_bytes'])}; peak memory {format_size(s['peak_rss_bytes'])} RSS "
        f"(largest source shard {format_size(s['largest_source_shard'])})"
    )
    if "uploaded" in s:
        click.echo(f"uploaded to {s['uploaded']}")
