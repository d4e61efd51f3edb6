"""`python -m mlx_engine_server` runs the same command as `mlx-server`."""

from .cli.main import cli

cli()
