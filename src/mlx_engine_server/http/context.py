"""What the app is told once (`ServerOptions`), and what a route hands the pipeline for one
request (`request_context`): plain values read here from Starlette's request and app state, so
that the pipeline never sees them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.requests import Request

from ..chat.plan import ChatFormats, chat_formats
from ..engine import EngineClient
from ..pipeline.context import GenerationOptions, RequestContext
from ..state.limits import RatePolicy
from .access_log import request_record
from .guards import HostPolicy


@dataclass(frozen=True)
class ServerOptions(GenerationOptions):
    """The part of Settings the HTTP layer needs, built once in serve()."""

    api_keys: tuple[str, ...] = ()
    host_policy: HostPolicy | None = None  # None: any Host header (not bound to loopback)
    cors_origins: tuple[str, ...] = ()
    max_header_bytes: int = 32 * 1024
    rate_limits: RatePolicy = field(default_factory=RatePolicy)
    session_ttl_s: float = 24 * 3600.0


def request_context(request: Request) -> RequestContext:
    state = request.app.state
    return RequestContext(
        engine=state.engine,
        options=state.options,
        chat_formats=lambda: chat_formats_of(request),
        compactions=state.compactions,
        timing=state.metrics,
        receive=request.receive,
        notes=request_record(request),
    )


def chat_formats_of(request: Request) -> ChatFormats:
    state = request.app.state
    if state.chat_formats is None:
        options: ServerOptions = state.options
        engine: EngineClient = state.engine
        state.chat_formats = chat_formats(
            engine.tokenizer,
            options.tool_call_parser,
            options.reasoning_parser,
            multimodal=engine.model.kind == "vision",
        )
    formats: ChatFormats = state.chat_formats
    return formats
