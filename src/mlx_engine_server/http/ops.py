"""Operator endpoints: /health (liveness), /v1/mlx/status (model, load), /metrics (Prometheus)."""

from __future__ import annotations

import dataclasses
import platform
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import __version__
from ..chat.overflow import CompactionCounters
from ..engine import EngineClient, EngineReport
from .metrics import ServerMetrics


async def health(request: Request) -> Response:
    engine: EngineClient = request.app.state.engine
    if engine.draining or not engine.alive:
        return JSONResponse({"status": "unavailable", "reason": _down_reason(engine)}, 503)
    return JSONResponse({"status": "ok", "model": engine.model.model_id})


def _down_reason(engine: EngineClient) -> str:
    if engine.failure is not None:
        return engine.failure
    return "shutting down" if engine.draining else "the generation engine is not running"


async def status(request: Request) -> Response:
    engine: EngineClient = request.app.state.engine
    body = status_body(engine, await engine.report())
    compactions: CompactionCounters = request.app.state.compactions
    body["context_overflow"] = compactions.as_dict()
    metrics: ServerMetrics = request.app.state.metrics
    body["latency"] = metrics.recent_latency()
    return JSONResponse(body)


def status_body(engine: EngineClient, report: EngineReport | None) -> dict[str, Any]:
    loaded = engine.model
    stats = engine.stats()  # as of `report`, or zeros
    return {
        "model": {
            "id": loaded.model_id,
            "path": loaded.model_path,
            "resolved_path": str(loaded.resolved_path),
            "adapter_path": loaded.adapter_path,
            "kind": loaded.kind,
            "context_window": loaded.context_window,
            "quantization": loaded.quantization,
            "dtype": loaded.dtype,
        },
        "device": {"name": loaded.device, "memory": report.device_memory if report else None},
        "distributed": _group_body(engine),
        "memory_budget": report.memory_budget if report else None,
        "engine": {
            "max_batch_size": engine.options.max_batch_size,
            "max_queue": engine.options.max_queue,
            "kv_bits": engine.options.kv_bits,
            "process_id": loaded.engine_pid,
            "warmup_s": loaded.warmup_s,
            "requests_active": stats.requests_active,
            "requests_queued": stats.requests_queued,
            "tokens_per_s": round(stats.tokens_per_s, 2),
            "event_frames": report.event_frames if report else 0,
            "event_send_s": round(report.event_send_s, 6) if report else 0.0,
        },
        "prefix_cache": _prefix_cache_body(report),
        "speculative": {
            "mode": engine.options.speculative,
            "draft_model": engine.options.draft_model_path,
            "draft_tokens_total": stats.draft_tokens_total,
            "accepted_tokens_total": stats.accepted_tokens_total,
            "acceptance_rate": round(stats.acceptance_rate, 4),
        },
        "counters": {
            "requests_total": stats.requests_total,
            "failures_total": stats.failures_total,
            "cancelled_total": stats.cancelled_total,
            "prompt_tokens_total": stats.prompt_tokens_total,
            "completion_tokens_total": stats.completion_tokens_total,
        },
        "uptime_s": round(time.time() - engine.started_at, 3),
        "version": {
            "server": __version__,
            "mlx": loaded.mlx_version,
            "python": platform.python_version(),
        },
    }


def _group_body(engine: EngineClient) -> dict[str, Any] | None:
    """The processes serving this model together; None for a process alone."""
    info = engine.model.group
    return dataclasses.asdict(info) if info is not None else None


def _prefix_cache_body(report: EngineReport | None) -> dict[str, float] | None:
    stats = report.prefix_cache if report is not None else None
    if stats is None:
        return None
    lookups = stats.hits + stats.misses
    return {
        **dataclasses.asdict(stats),
        "hit_rate": round(stats.hits / lookups, 4) if lookups else 0.0,
    }


async def metrics_text(request: Request) -> Response:
    engine: EngineClient = request.app.state.engine
    await engine.report()  # the engine's figures, as of now, for the collector
    metrics: ServerMetrics = request.app.state.metrics
    return Response(metrics.render(), media_type=metrics.content_type)
