"""The illada-mlx converter (import name `illada_mlx_convert`, source folder `convert/`)."""

from .converter import convert, resolve_source

__all__ = ["convert", "resolve_source"]
