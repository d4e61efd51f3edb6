"""The Starlette app: the middleware stack and the route table of every protocol's routes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..chat.overflow import CompactionCounters
from ..engine import EngineClient
from ..pipeline.run import CACHED_TOKENS_HEADER, COMPACTION_HEADER
from ..protocols.anthropic import routes as anthropic_routes
from ..protocols.conversations import routes as conversations_routes
from ..protocols.openai import routes as openai_routes
from ..protocols.openai.tokenize import detokenize, tokenize
from ..protocols.responses import routes as openai_responses_routes
from ..state.sqlite import SqliteStore
from ..state.store import StateStore
from .access_log import ANTHROPIC_REQUEST_ID_HEADER, REQUEST_ID_HEADER, RequestLog
from .context import ServerOptions
from .errors import EXCEPTION_HANDLERS, Dialects
from .guards import ApiKeyGuard, Cors, HeaderLimit, HostGuard, OriginGuard, OriginPolicy
from .metrics import RequestCounter, ServerMetrics
from .openapi import openapi_json
from .ops import health, metrics_text, status
from .pages import docs_page, static_file, status_page
from .ratelimit import RATE_LIMIT_HEADERS, RateLimit

__all__ = ["ServerOptions", "create_app"]

ROUTE_PATHS_ANTHROPIC = tuple(route.path for route in anthropic_routes.ROUTES)
# Paths both APIs define: Anthropic's SDK always names its API version in a header.
SHARED_PATHS = ("/v1/models",)
ANTHROPIC_VERSION_HEADER = "anthropic-version"
Endpoint = Callable[[Request], Awaitable[Response]]
# What a browser page may read of a cross-origin response besides the safelisted headers.
EXPOSED_HEADERS = (
    *(REQUEST_ID_HEADER, ANTHROPIC_REQUEST_ID_HEADER, CACHED_TOKENS_HEADER, COMPACTION_HEADER),
    "retry-after",
    *RATE_LIMIT_HEADERS,
)


def create_app(
    engine: EngineClient, options: ServerOptions | None = None, store: StateStore | None = None
) -> Starlette:
    """An app around an engine whose model is already loaded; the app stops the engine and
    closes the state store on exit. Without a store, state lives in memory (SQLite)."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        engine.stop()
        await state.close()

    options = options or ServerOptions()
    state = store if store is not None else SqliteStore(None)
    compactions = CompactionCounters(options.context_overflow)
    metrics = ServerMetrics(engine, compactions)
    app = Starlette(
        middleware=_middleware(options, metrics, state),
        routes=[
            Route("/v1/chat/completions", openai_routes.chat_completions, methods=["POST"]),
            Route("/v1/completions", openai_routes.completions, methods=["POST"]),
            Route(
                "/v1/models",
                _by_client(openai_routes.list_models, anthropic_routes.list_models),
                methods=["GET"],
            ),
            Route("/v1/sessions/{session_id}", openai_routes.get_session, methods=["GET"]),
            Route("/v1/sessions/{session_id}", openai_routes.remove_session, methods=["DELETE"]),
            Route("/tokenize", tokenize, methods=["POST"]),
            Route("/detokenize", detokenize, methods=["POST"]),
            Route(
                "/v1/models/{model_id:path}",
                _by_client(openai_routes.get_model, anthropic_routes.get_model),
                methods=["GET"],
            ),
            Route("/v1/mlx/status", status, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics_text, methods=["GET"]),
            *anthropic_routes.ROUTES,
            *_responses_routes(),
            *(
                Route(path, endpoint, methods=[method])
                for path, endpoint, method in conversations_routes.ROUTES_TABLE
            ),
            Route("/openapi.json", openapi_json, methods=["GET"]),
            Route("/", status_page, methods=["GET"]),
            Route("/docs", docs_page, methods=["GET"]),
            Route("/static/{name}", static_file, methods=["GET"]),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.dialects = Dialects(
        dict.fromkeys(ROUTE_PATHS_ANTHROPIC, anthropic_routes.DIALECT),
        dict.fromkeys(SHARED_PATHS, (ANTHROPIC_VERSION_HEADER, anthropic_routes.DIALECT)),
    )
    app.state.engine = engine
    app.state.store = state
    app.state.metrics = metrics
    app.state.options = options
    app.state.compactions = compactions
    app.state.chat_formats = None  # worked out from the model's tokenizer on first use
    app.state.limits = options.limits
    return app


def _by_client(openai: Endpoint, anthropic: Endpoint) -> Endpoint:
    """One of SHARED_PATHS: answered in the shape of the API whose SDK asks."""

    async def endpoint(request: Request) -> Response:
        if ANTHROPIC_VERSION_HEADER in request.headers:
            return await anthropic(request)
        return await openai(request)

    return endpoint


def _responses_routes() -> list[Route]:
    routes = openai_responses_routes
    one = "/v1/responses/{response_id}"
    return [
        Route("/v1/responses", routes.responses, methods=["POST"]),
        Route(one, routes.get_response, methods=["GET"]),
        Route(one, routes.delete_response, methods=["DELETE"]),
        Route(f"{one}/input_items", routes.list_input_items, methods=["GET"]),
    ]


def _middleware(
    options: ServerOptions, metrics: ServerMetrics, store: StateStore
) -> list[Middleware]:
    """Outermost first: log and count everything; then Host, Origin, CORS (preflights need no
    key), API key, rate limits (counted per accepted key)."""
    stack = [
        Middleware(RequestLog),
        # Outside the guards: their refusals (401, 403, 429, ...) are counted too.
        Middleware(RequestCounter, metrics=metrics),
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
                allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                allow_headers=["*"],
                allow_credentials=False,  # keys travel in a header, never as cookies
                expose_headers=list(EXPOSED_HEADERS),
                max_age=600,
            )
        )
    if options.api_keys:
        stack.append(Middleware(ApiKeyGuard, api_keys=options.api_keys))
    if options.rate_limits.active:
        stack.append(Middleware(RateLimit, store=store, policy=options.rate_limits))
    return stack
