"""Rate limits per API key (the client address without keys): 429 with Retry-After, and
OpenAI's `x-ratelimit-*` headers on every answer of a limited key.

Pure ASGI middleware inside the API-key guard (a wrong key is refused before it is counted) and
inside the access log, whose record gives the tokens a request used once it is answered.
"""

from __future__ import annotations

import logging

from starlette._utils import get_route_path
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import APIError, RateLimitError
from ..state.limits import RateDecision, RatePolicy, add_tokens, admit_request
from ..state.store import StateStore
from .access_log import RECORD_KEY, RequestRecord
from .errors import error_response
from .guards import OWNER_KEY, PUBLIC_PATHS, dialect_of

logger = logging.getLogger(__name__)
# Never counted: the pages and /health (public), and what the status page polls every 2 s or a
# scraper reads, which do no model work; counting them would lock a page's own chat box out.
UNCOUNTED_PATHS = PUBLIC_PATHS | {"/v1/mlx/status", "/metrics", "/openapi.json"}
RATE_LIMIT_HEADERS = tuple(
    f"x-ratelimit-{what}-{unit}"
    for unit in ("requests", "tokens")
    for what in ("limit", "remaining", "reset")
)


class RateLimit:
    def __init__(self, app: ASGIApp, store: StateStore, policy: RatePolicy) -> None:
        self.app = app
        self.store = store
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or get_route_path(scope) in UNCOUNTED_PATHS:
            await self.app(scope, receive, send)
            return
        counter = rate_counter(scope)
        limits = self.policy.limits_for(counter)
        if not limits.active:
            await self.app(scope, receive, send)
            return
        try:
            decision = await admit_request(self.store, limits, counter)
        except APIError as error:  # the store failed: middleware renders its own errors
            await error_response(error, dialect_of(scope))(scope, receive, send)
            return
        if decision.refused_for is not None:
            await _refuse(decision, scope, receive, send)
            return
        try:
            await self.app(scope, receive, _with_headers(send, decision))
        finally:
            await _count_tokens(self.store, counter, _tokens_used(scope))


def rate_counter(scope: Scope) -> str:
    """The key's owner id when keys are required, else the client's address."""
    owner = scope.get(OWNER_KEY)
    if isinstance(owner, str):
        return owner
    client = scope.get("client")
    return f"address:{client[0] if client else 'unknown'}"


def _with_headers(send: Send, decision: RateDecision) -> Send:
    async def send_with_limits(message: Message) -> None:
        if message["type"] == "http.response.start":
            MutableHeaders(scope=message).update(decision.headers())
        await send(message)

    return send_with_limits


async def _refuse(decision: RateDecision, scope: Scope, receive: Receive, send: Send) -> None:
    limits = decision.limits
    limit = (
        f"{limits.requests_per_minute} requests"
        if decision.refused_for == "requests"
        else f"{limits.tokens_per_minute} tokens"
    )
    error = RateLimitError(
        f"Rate limit reached: {limit} per minute. Try again in {decision.retry_after_s} s.",
        retry_after_s=decision.retry_after_s,
    )
    response = error_response(error, dialect_of(scope))
    response.headers.update(decision.headers())
    await response(scope, receive, send)


async def _count_tokens(store: StateStore, counter: str, tokens: int) -> None:
    """After the answer: a failing store can only be logged now."""
    try:
        await add_tokens(store, counter, tokens)
    except APIError:
        logger.warning("could not count %d tokens: the state store failed", tokens)


def _tokens_used(scope: Scope) -> int:
    record = scope.get(RECORD_KEY)
    if not isinstance(record, RequestRecord):
        return 0
    completion = record.generation.completion_tokens if record.generation else 0
    return (record.prompt_tokens or 0) + completion
