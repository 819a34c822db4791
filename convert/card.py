"""The model card (README.md) written into every converted directory, short like mlx-lm's."""

from __future__ import annotations

import shlex
from importlib import metadata
from typing import Optional

from illada_mlx.progress import format_bytes


def format_size(n: int) -> str:
    """Bytes as decimal GB (10^9) from 1 GB up, else MB (10^6): the one unit every message uses."""
    return format_bytes(n)


def describe_quantization(record: Optional[dict], recipe: Optional[str]) -> str:
    """'none', or the default mode / bits / group size, with the recipe's name when one set other layers'."""
    if not record:
        return "none"
    text = f"{record['mode']} {record['bits']}-bit, group size {record['group_size']}"
    return f"{text}, recipe {recipe}" if recipe else text


def _version() -> str:
    try:
        return metadata.version("illada-mlx")
    except metadata.PackageNotFoundError:
        return "(source tree)"


def model_card(
    name: str,
    ref: str,
    source: str,
    hub_source: bool,
    layout: str,
    quantization: str,
    bits_per_weight: float,
    size_bytes: int,
) -> str:
    """The card's markdown: hub metadata, what was converted how, and how to run it.

    `name` heads the card, `ref` is what `--model` / `load()` is given (the upload repo or the output path),
    `source` the source's repo id (`hub_source`) or directory name."""
    meta = ["library_name: mlx", "pipeline_tag: text-generation", "tags:", "- mlx", "- illada-mlx"]
    if hub_source:
        meta.append(f"base_model: {source}")
    origin = f"[{source}](https://huggingface.co/{source})" if hub_source else f"the local checkpoint `{source}`"
    return "\n".join(
        [
            "---",
            *meta,
            "---",
            "",
            f"# {name}",
            "",
            f"Converted to MLX from {origin} with illada-mlx {_version()}.",
            "",
            "| | |",
            "|---|---|",
            f"| source layout | {layout} |",
            f"| quantization | {quantization} |",
            f"| bits per weight | {bits_per_weight:.3f} |",
            f"| size | {format_size(size_bytes)} |",
            "",
            "## Use with illada-mlx",
            "",
            "```bash",
            f'illada-mlx generate --model {shlex.quote(ref)} -p "Why is the sky blue?"',
            "```",
            "",
            "```python",
            "from illada_mlx import load",
            "",
            f'model, tokenizer = load("{ref}")',
            "```",
            "",
        ]
    )
