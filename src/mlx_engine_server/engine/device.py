"""Read-only facts about the MLX device, for /v1/mlx/status. Safe to call from any thread."""

from __future__ import annotations

from importlib.metadata import version

import mlx.core as mx


def device_name() -> str:
    return str(mx.default_device())


def memory_bytes() -> dict[str, int]:
    """Memory MLX holds now and at its peak; these calls work on Metal, CUDA and CPU alike."""
    return {
        "active_bytes": int(mx.get_active_memory()),
        "peak_bytes": int(mx.get_peak_memory()),
        "cache_bytes": int(mx.get_cache_memory()),
    }


def mlx_version() -> str:
    return version("mlx")
