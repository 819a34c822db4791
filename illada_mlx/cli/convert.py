"""`illada-mlx convert`: the converter's own command (illada_mlx_convert.cli), imported only when it runs so
that the other commands never load the converter."""

from illada_mlx_convert.cli import convert_command as command

__all__ = ["command"]
