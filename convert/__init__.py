"""The illada-mlx converter (import name `illada_mlx_convert`, source folder `convert/`)."""

from .converter import convert
from .demo import ensure_demo_model

__all__ = ["convert", "ensure_demo_model"]
