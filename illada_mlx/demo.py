"""The bundled demo model: a small iLLaDA-format fp32 HF checkpoint shipped in the package (illada_mlx/demo_model/).

`load()` reads it in memory; `illada_mlx_convert.ensure_demo_model` converts it into `converted_path()`."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .config import IlladaError

BUNDLED = Path(__file__).parent / "demo_model"


def cache_root() -> Path:
    """$ILLADA_MLX_CACHE, else $XDG_CACHE_HOME/illada-mlx, else ~/.cache/illada-mlx."""
    base = os.environ.get("ILLADA_MLX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "illada-mlx"
    )
    return Path(base)


def bundled_digest() -> str:
    """The first 12 hex digits of a SHA-1 over the bundled checkpoint's files (names and bytes)."""
    h = hashlib.sha1()
    for f in sorted(BUNDLED.iterdir()):
        if f.is_file() and f.suffix in (".json", ".safetensors"):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def bundled() -> Path:
    """The bundled checkpoint's directory; refused when this install lacks its weights."""
    if not (BUNDLED / "model.safetensors").exists():
        raise IlladaError("the bundled demo model is missing from this install; pass --model DIR")
    return BUNDLED


def converted_path() -> Path:
    """Where the bundled checkpoint's MLX conversion lives: one directory per bundled_digest under cache_root()."""
    return cache_root() / f"demo-{bundled_digest()}"
