"""`python -m mlx_engine_server` runs the same command as `mlx-server`."""

from .main import cli

cli()
