"""The bundled demo model's MLX conversion, made on first use through the real converter."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Optional

from illada_mlx.config import IlladaError
from illada_mlx.demo import bundled, converted_path
from illada_mlx.load import load

from .converter import convert
from .output import has_only_our_names


def _problem(dst: Path) -> Optional[str]:
    """Why the cached conversion cannot be used (loading it fails), or None when it loads."""
    try:
        load(str(dst))
    except IlladaError as e:
        return str(e)
    return None


def ensure_demo_model(notice: Optional[Callable[[str], None]] = None) -> Path:
    """The converted demo model's directory, converting the bundled checkpoint into it when it is not there
    yet or does not load (a corrupt cache is removed, when it holds only files convert writes, and converted
    again); `notice` gets one line, only when a conversion runs."""
    dst = converted_path()
    say = notice or (lambda m: None)
    if dst.exists() or dst.is_symlink():
        problem = _problem(dst)
        if problem is None:
            return dst
        if not has_only_our_names(dst):
            raise IlladaError(
                f"{dst} does not load ({problem}) and holds files convert does not write; remove it "
                "or set ILLADA_MLX_CACHE to another directory"
            )
        say(f"the demo model in {dst} is corrupt ({problem}); converting it again")
        shutil.rmtree(dst)
    else:
        say(f"converting the bundled demo model into {dst} (first use only)")
    convert(str(bundled()), str(dst), progress=False, notice=say)
    return dst
