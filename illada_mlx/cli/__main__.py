"""`python -m illada_mlx.cli ...` runs the `illada-mlx` command."""

from . import main

main()
