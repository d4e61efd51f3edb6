"""Backend defaults the engine applies before its first MLX operation."""

from __future__ import annotations

import os

import pytest

from mlx_engine_server.engine.device import CUDA_SERVER_ENV, apply_backend_defaults


def test_cuda_defaults_are_set_before_the_engine_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in CUDA_SERVER_ENV:
        monkeypatch.delenv(name, raising=False)
    apply_backend_defaults()

    assert os.environ["MLX_CUDA_USE_CUDNN_SDPA"] == "0"
    assert os.environ["MLX_ENABLE_CACHE_THRASHING_CHECK"] == "0"


def test_an_operators_own_value_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLX_CUDA_USE_CUDNN_SDPA", "1")
    apply_backend_defaults()

    assert os.environ["MLX_CUDA_USE_CUDNN_SDPA"] == "1"
