"""The `illada-mlx` command: convert, generate, chat, serve, bench."""

from __future__ import annotations

import sys

import click

from .config import IlladaError


class _Group(click.Group):
    """Every user-facing failure is one line on stderr and exit code 1, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except IlladaError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group)
@click.version_option(package_name="illada-mlx")
def main():
    """Run iLLaDA / LLaDA masked-diffusion language models with MLX."""


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


@main.command()
@click.option("--hf-path", required=True, help="Source: a local HF checkpoint dir or a hub repo id.")
@click.option("--mlx-path", required=True, help="Destination MLX model dir (written atomically).")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default=None,
              help="Cast float tensors (default: keep the checkpoint's dtype).")
@click.option("-q", "--quantize", is_flag=True, help="Quantize linear layers and the embedding.")
@click.option("--q-bits", type=click.Choice(["2", "3", "4", "5", "6", "8"]), default="4", show_default=True)
@click.option("--q-group-size", type=click.Choice(["16", "32", "64", "128"]), default="64", show_default=True)
@click.option("--q-mode", type=click.Choice(["affine", "mxfp4", "mxfp8", "nvfp4"]), default="affine", show_default=True)
@click.option("--q-recipe", type=click.Choice(["mixed_4_6", "mixed_4_8", "mixed_3_6", "mixed_2_6"]), default=None,
              help="Mixed precision: body bits_embedding/head bits (3/2-bit recipes also keep sensitive layers at 6).")
@click.option("--mask-id", type=int, default=None, help="Override the mask token id (iLLaDA: 5).")
@click.option("--max-shard-size", type=float, default=2.0, show_default=True, help="Output shard size in GB.")
@click.option("--force", is_flag=True, help="Replace a non-empty destination.")
def convert(hf_path, mlx_path, dtype, quantize, q_bits, q_group_size, q_mode, q_recipe, mask_id, max_shard_size, force):
    """Convert an HF checkpoint (iLLaDA or LLaDA layout) into an MLX model directory."""
    from illada_mlx_convert import convert as run

    s = run(hf_path, mlx_path, dtype=dtype, quantize=quantize, q_bits=int(q_bits), q_group_size=int(q_group_size),
            q_mode=q_mode, q_recipe=q_recipe, mask_id=mask_id, force=force,
            max_shard_bytes=int(max_shard_size * 2**30))
    click.echo(f"wrote {s['path']} ({s['layout']} layout, {s['output_shards']} shard(s), {_gb(s['output_bytes'])}) "
               f"from {_gb(s['source_bytes'])}; peak memory {_gb(s['peak_rss_bytes'])} RSS "
               f"(largest source shard {_gb(s['largest_source_shard'])})")


if __name__ == "__main__":
    main()
