"""The bundled demo model: a small iLLaDA-format HF checkpoint shipped in the package (illada_mlx/demo_model/),
converted through the real converter on first use into a cache directory and reused afterwards."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .config import IlladaError

BUNDLED = Path(__file__).parent / "demo_model"


def cache_root() -> Path:
    base = os.environ.get("ILLADA_MLX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "illada-mlx")
    return Path(base)


def _fingerprint() -> str:
    h = hashlib.sha1()
    for f in sorted(BUNDLED.iterdir()):
        if f.is_file() and f.suffix in (".json", ".safetensors"):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def default_model_path() -> Path:
    """The converted demo model's MLX dir (converting it the first time)."""
    if not (BUNDLED / "model.safetensors").exists():
        raise IlladaError("the bundled demo model is missing from this install; pass --model DIR")
    dst = cache_root() / f"demo-{_fingerprint()}"
    if not (dst / "config.json").exists():
        from illada_mlx_convert import convert

        convert(str(BUNDLED), str(dst), force=True, progress=False)
    return dst
