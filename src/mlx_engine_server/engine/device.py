"""Facts about the MLX device for /v1/mlx/status, and the backend defaults a server needs."""

from __future__ import annotations

import os
from importlib.metadata import version
from pathlib import Path

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


# Defaults for MLX's CUDA backend, set before the first MLX operation (each is read once, when its
# cache is first used); an operator's own value in the environment wins. Measured on an H100 (see
# benchmarks/README.md): cuDNN attention builds an execution plan for every new (query, key)
# length pair, about 50 ms each, and a server's prefill shapes rarely repeat: TTFT of a 219-token
# prompt 651 ms with it, 29 ms without; 32 clients 1,413 tok/s with it, 2,088 without. MLX's own
# attention has no per-shape cost. The thrashing check counts misses over the whole process life
# and then fails every new shape with an exception: it would stop a long-running server.
CUDA_SERVER_ENV = {
    "MLX_CUDA_USE_CUDNN_SDPA": "0",
    "MLX_ENABLE_CACHE_THRASHING_CHECK": "0",
}


KERNEL_CACHE_ENV = "MLX_PTX_CACHE_DIR"


def keep_kernels_in(cache_dir: Path) -> None:
    """MLX's CUDA backend compiles kernels at first use (NVRTC) and keeps them in
    $MLX_PTX_CACHE_DIR, by default under $TMPDIR: under --cache-dir they outlive a restart.
    Set before the engine starts; an operator's own value wins."""
    if KERNEL_CACHE_ENV in os.environ:
        return
    path = cache_dir / "cuda-kernels" / mlx_version()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return  # MLX's own default then
    os.environ[KERNEL_CACHE_ENV] = str(path)


def apply_backend_defaults() -> None:
    for name, value in CUDA_SERVER_ENV.items():
        os.environ.setdefault(name, value)
