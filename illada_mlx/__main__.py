"""`python -m illada_mlx ...` runs the `illada-mlx` command."""

from .cli import main

main(prog_name="illada-mlx")
