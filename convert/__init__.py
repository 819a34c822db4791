"""The illada-mlx converter (import name `illada_mlx_convert`, source folder `convert/`)."""

from .cli import convert_command
from .converter import convert
from .demo import ensure_demo_model

__all__ = ["convert", "convert_command", "ensure_demo_model"]
