"""mlx-engine-server: an OpenAI-compatible server for one MLX model."""

__version__ = "0.1.0"
