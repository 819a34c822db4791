"""The bundled demo model's MLX conversion, made on first use through the real converter."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from illada_mlx.demo import bundled, converted_path

from .converter import convert


def ensure_demo_model(notice: Optional[Callable[[str], None]] = None) -> Path:
    """The converted demo model's directory, converting the bundled checkpoint into it when it is not there
    yet; `notice` gets one line, only when a conversion runs."""
    dst = converted_path()
    if not (dst / "config.json").exists():
        src = bundled()
        if notice:
            notice(f"converting the bundled demo model into {dst} (first use only)")
        convert(str(src), str(dst), force=True, progress=False)
    return dst
