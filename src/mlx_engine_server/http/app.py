"""The Starlette app: the middleware stack and the route table of every protocol's routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route

from ..chat.overflow import CompactionCounters
from ..engine import EngineClient
from ..pipeline.prepare import ServerOptions
from ..pipeline.run import CACHED_TOKENS_HEADER, COMPACTION_HEADER
from ..protocols.anthropic import routes as anthropic_routes
from ..protocols.openai import routes as openai_routes
from ..protocols.openai.tokenize import detokenize, tokenize
from ..protocols.responses import routes as openai_responses_routes
from .access_log import REQUEST_ID_HEADER, RequestLog
from .errors import EXCEPTION_HANDLERS, Dialects
from .guards import ApiKeyGuard, Cors, HeaderLimit, HostGuard, OriginGuard, OriginPolicy
from .metrics import RequestCounter, ServerMetrics
from .openapi import openapi_json
from .ops import health, metrics_text, status

__all__ = ["ServerOptions", "create_app"]

ROUTE_PATHS_ANTHROPIC = tuple(route.path for route in anthropic_routes.ROUTES)
# What a browser page may read of a cross-origin response besides the safelisted headers.
EXPOSED_HEADERS = (REQUEST_ID_HEADER, CACHED_TOKENS_HEADER, COMPACTION_HEADER, "retry-after")


def create_app(engine: EngineClient, options: ServerOptions | None = None) -> Starlette:
    """An app around an engine whose model is already loaded; the app stops the engine on exit."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        engine.stop()

    options = options or ServerOptions()
    compactions = CompactionCounters(options.context_overflow)
    metrics = ServerMetrics(engine, compactions)
    app = Starlette(
        middleware=_middleware(options, metrics),
        routes=[
            Route("/v1/chat/completions", openai_routes.chat_completions, methods=["POST"]),
            Route("/v1/completions", openai_routes.completions, methods=["POST"]),
            Route("/v1/models", openai_routes.list_models, methods=["GET"]),
            Route("/tokenize", tokenize, methods=["POST"]),
            Route("/detokenize", detokenize, methods=["POST"]),
            Route("/v1/models/{model_id:path}", openai_routes.get_model, methods=["GET"]),
            Route("/v1/mlx/status", status, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics_text, methods=["GET"]),
            *anthropic_routes.ROUTES,
            Route("/v1/responses", openai_responses_routes.responses, methods=["POST"]),
            Route("/openapi.json", openapi_json, methods=["GET"]),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.dialects = Dialects(dict.fromkeys(ROUTE_PATHS_ANTHROPIC, anthropic_routes.DIALECT))
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.options = options
    app.state.compactions = compactions
    app.state.chat_formats = None  # worked out from the model's tokenizer on first use
    app.state.limits = options.limits
    return app


def _middleware(options: ServerOptions, metrics: ServerMetrics) -> list[Middleware]:
    """Outermost first: log everything; then Host, Origin, CORS (preflights need no key), key."""
    stack = [
        Middleware(RequestLog),
        Middleware(HeaderLimit, max_header_bytes=options.max_header_bytes),
    ]
    if options.host_policy is not None:
        stack.append(Middleware(HostGuard, policy=options.host_policy))
    origins = OriginPolicy(frozenset(options.cors_origins))
    stack.append(Middleware(OriginGuard, policy=origins))
    if options.cors_origins:
        stack.append(
            Middleware(
                Cors,
                allow_origins=list(options.cors_origins),
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["*"],
                allow_credentials=False,  # keys travel in a header, never as cookies
                expose_headers=list(EXPOSED_HEADERS),
                max_age=600,
            )
        )
    if options.api_keys:
        stack.append(Middleware(ApiKeyGuard, api_keys=options.api_keys))
    stack.append(Middleware(RequestCounter, metrics=metrics))
    return stack
