"""Operator endpoints: /health (liveness), /v1/mlx/status (model, load), /metrics (Prometheus)."""

from __future__ import annotations

import dataclasses
import platform
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from . import __version__
from .engine import Engine
from .engine.device import device_name, memory_bytes, mlx_version


async def health(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    if engine.draining or not engine.alive:
        reason = "shutting down" if engine.draining else "the generation engine is not running"
        return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
    return JSONResponse({"status": "ok", "model": engine.loaded.model_id})


async def status(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    return JSONResponse(status_body(engine))


def status_body(engine: Engine) -> dict[str, Any]:
    loaded = engine.loaded
    stats = engine.stats()
    return {
        "model": {
            "id": loaded.model_id,
            "path": loaded.model_path,
            "resolved_path": str(loaded.resolved_path),
            "adapter_path": loaded.adapter_path,
            "kind": loaded.kind,
            "context_window": loaded.context_window,
            "quantization": loaded.quantization,
        },
        "device": {"name": device_name(), "memory": memory_bytes()},
        "engine": {
            "max_batch_size": engine.options.max_batch_size,
            "max_queue": engine.options.max_queue,
            "requests_active": stats.requests_active,
            "requests_queued": stats.requests_queued,
        },
        "prefix_cache": _prefix_cache_body(engine),
        "counters": {
            "requests_total": stats.requests_total,
            "failures_total": stats.failures_total,
            "prompt_tokens_total": stats.prompt_tokens_total,
            "completion_tokens_total": stats.completion_tokens_total,
        },
        "uptime_s": round(time.time() - engine.started_at, 3),
        "version": {
            "server": __version__,
            "mlx": mlx_version(),
            "python": platform.python_version(),
        },
    }


def _prefix_cache_body(engine: Engine) -> dict[str, int] | None:
    stats = engine.prefix_cache_stats()
    return dataclasses.asdict(stats) if stats else None


async def metrics(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    stats = engine.stats()
    memory = memory_bytes()
    lines = [
        _metric("mlx_server_requests_total", "counter", stats.requests_total),
        _metric("mlx_server_request_failures_total", "counter", stats.failures_total),
        _metric("mlx_server_prompt_tokens_total", "counter", stats.prompt_tokens_total),
        _metric("mlx_server_completion_tokens_total", "counter", stats.completion_tokens_total),
        _metric("mlx_server_requests_active", "gauge", stats.requests_active),
        _metric("mlx_server_requests_queued", "gauge", stats.requests_queued),
        _metric("mlx_server_memory_active_bytes", "gauge", memory["active_bytes"]),
        _metric("mlx_server_memory_peak_bytes", "gauge", memory["peak_bytes"]),
    ]
    cache = engine.prefix_cache_stats()
    if cache is not None:
        lines += [
            _metric("mlx_server_prefix_cache_bytes", "gauge", cache.bytes),
            _metric("mlx_server_prefix_cache_entries", "gauge", cache.entries),
            _metric("mlx_server_prefix_cache_hits_total", "counter", cache.hits),
            _metric("mlx_server_prefix_cache_misses_total", "counter", cache.misses),
            _metric("mlx_server_cached_prompt_tokens_total", "counter", cache.cached_tokens_total),
        ]
    return PlainTextResponse("".join(lines), media_type="text/plain; version=0.0.4")


def _metric(name: str, kind: str, value: int) -> str:
    return f"# TYPE {name} {kind}\n{name} {value}\n"
