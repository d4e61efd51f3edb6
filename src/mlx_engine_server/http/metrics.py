"""Prometheus metrics: HTTP requests by route and status, latency histograms, engine gauges.

Each app owns its registry, so several apps in one process (tests, embedding) never collide.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette._utils import get_route_path  # the router's own path: the one it routes by
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from ..chat.overflow import CompactionCounters
from ..engine import EngineClient
from .access_log import Exchange
from .latency import RecentLatencies

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
OTHER_PATH = "other"  # every path no route matched: the label set stays bounded
PATH_CONVERTER = re.compile(r"\{(\w+):\w+\}")


class ServerMetrics:
    """What the HTTP side measures; also the Generation's timing observer."""

    def __init__(self, engine: EngineClient, compactions: CompactionCounters | None = None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mlx_server_http_requests",
            "HTTP requests by route and status code.",
            ["path", "status"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "mlx_server_time_to_first_token_seconds",
            "From request admission to the first generated text.",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.itl = Histogram(
            "mlx_server_inter_token_latency_seconds",
            "Between successive pieces of generated text of one request.",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.recent_ttft = RecentLatencies()
        self.recent_itl = RecentLatencies()
        self.registry.register(EngineCollector(engine))
        if compactions is not None:
            self.registry.register(CompactionCollector(compactions))

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.recent_ttft.add(seconds)

    def next_token(self, seconds: float) -> None:
        self.itl.observe(seconds)
        self.recent_itl.add(seconds)

    def recent_latency(self) -> dict[str, object]:
        """The last minute's TTFT and inter-token latency percentiles, for /v1/mlx/status."""
        return {
            "window_s": self.recent_ttft.window_s,
            "ttft_s": self.recent_ttft.summary(),
            "itl_s": self.recent_itl.summary(),
        }

    content_type = CONTENT_TYPE_LATEST

    def render(self) -> bytes:
        return generate_latest(self.registry)


class EngineCollector(Collector):
    """Engine counters and gauges: the last report, which /metrics asks for before it renders."""

    def __init__(self, engine: EngineClient) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats()
        yield _counter("mlx_server_requests", "Requests admitted.", stats.requests_total)
        yield _counter(
            "mlx_server_request_failures", "Requests ended by errors.", stats.failures_total
        )
        yield _counter(
            "mlx_server_request_cancellations",
            "Requests ended because their client hung up.",
            stats.cancelled_total,
        )
        yield _counter(
            "mlx_server_prompt_tokens", "Prompt tokens admitted.", stats.prompt_tokens_total
        )
        yield _counter(
            "mlx_server_completion_tokens", "Tokens generated.", stats.completion_tokens_total
        )
        yield _gauge("mlx_server_batch_size", "Sequences in the batch.", stats.requests_active)
        yield _counter(
            "mlx_server_draft_tokens", "Speculative tokens drafted.", stats.draft_tokens_total
        )
        yield _counter(
            "mlx_server_accepted_draft_tokens",
            "Speculative tokens the model accepted.",
            stats.accepted_tokens_total,
        )
        yield _gauge(
            "mlx_server_draft_acceptance_rate",
            "Accepted over drafted tokens since start.",
            stats.acceptance_rate,
        )
        yield _gauge("mlx_server_queue_depth", "Requests waiting.", stats.requests_queued)
        report = self.engine.last_report
        cache = report.prefix_cache if report is not None else None
        if cache is not None:
            yield _gauge("mlx_server_prefix_cache_bytes", "Bytes held.", cache.bytes)
            yield _gauge("mlx_server_prefix_cache_entries", "Entries held.", cache.entries)
            yield _counter("mlx_server_prefix_cache_hits", "Lookups reusing a prefix.", cache.hits)
            yield _counter(
                "mlx_server_prefix_cache_misses", "Lookups reusing nothing.", cache.misses
            )
            yield _counter(
                "mlx_server_cached_prompt_tokens",
                "Prompt tokens not prefilled.",
                cache.cached_tokens_total,
            )


class CompactionCollector(Collector):
    """What the context-overflow policy did to conversations too long for the window."""

    def __init__(self, counters: CompactionCounters) -> None:
        self.counters = counters

    def collect(self) -> Iterator[Metric]:
        counters = self.counters
        compactions = CounterMetricFamily(
            "mlx_server_context_compactions",
            "Conversations compacted to fit the context window, by policy.",
            labels=["policy"],
        )
        compactions.add_metric(["truncate"], counters.truncations)
        compactions.add_metric(["summarize"], counters.summaries)
        yield compactions
        yield _counter(
            "mlx_server_context_messages_dropped",
            "Messages dropped by truncation.",
            counters.messages_dropped,
        )
        yield _counter(
            "mlx_server_context_messages_summarized",
            "Messages replaced by a summary.",
            counters.messages_summarized,
        )
        yield _counter(
            "mlx_server_context_summary_tokens",
            "Prompt and completion tokens spent writing summaries.",
            counters.summary_tokens,
        )
        yield _counter(
            "mlx_server_context_overflow_refusals",
            "Requests compaction could not make fit (answered 400 context_length_exceeded).",
            counters.refusals,
        )


def _counter(name: str, documentation: str, value: int) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class RequestCounter:
    """Pure ASGI middleware counting every response, errors included, by route and status."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exchange = Exchange(scope, receive, send)
        try:
            await self.app(scope, exchange.receive, exchange.send)
        finally:
            path = _route_label(scope)
            self.metrics.requests.labels(path=path, status=str(exchange.status)).inc()


def _route_label(scope: Scope) -> str:
    """The template of the route that answered (`/v1/models/{model_id}`), which the router
    leaves in the scope, or of the route a guard refused the request for; "other" for a path
    no route matches."""
    route = scope.get("route") or _route_of_path(scope)
    template = getattr(route, "path", None)
    if not isinstance(template, str):
        return OTHER_PATH
    return PATH_CONVERTER.sub(r"{\1}", template)


def _route_of_path(scope: Scope) -> BaseRoute | None:
    """A guard answered before the router ran: the app's first route whose path matches."""
    path = get_route_path(scope)
    routes: list[BaseRoute] = getattr(getattr(scope.get("app"), "router", None), "routes", [])
    for route in routes:
        pattern = getattr(route, "path_regex", None)
        if pattern is not None and pattern.match(path):
            return route
    return None
