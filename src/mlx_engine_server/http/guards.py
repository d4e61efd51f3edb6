"""Guards in front of the routes: header size, the Host allow-list (DNS rebinding), API keys.

Both are pure ASGI middleware that look only at the ASGI scope: the path the router will match
(never a URL rebuilt from the Host header) and the raw headers. Every path needs a key except
the ones in PUBLIC_PATHS, matched exactly as the router matches them, so no other spelling of a
path (`//v1/models`, `/v1/models/`, `%2F`, a root-path prefix) can skip the check.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass

from starlette._utils import get_route_path  # the router's own path: the one it routes by
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import (
    APIError,
    AuthenticationError,
    ErrorDialect,
    HeadersTooLargeError,
    InvalidRequestError,
)
from ..state.store import NO_OWNER, owner_of
from .errors import Dialects, error_response
from .pages import PAGE_PATHS

# The browser pages hold no secret; what they fetch needs the key (they ask for it).
PUBLIC_PATHS = frozenset({"/health", *PAGE_PATHS})
OWNER_KEY = "mlx_engine_server.owner"  # the scope's owner id of the accepted key (state/)
LOOPBACK_NAMES = frozenset({"localhost"})


@dataclass(frozen=True)
class HostPolicy:
    """Which Host header names may reach the app; loopback names and addresses always may."""

    allowed_hosts: frozenset[str] = frozenset()

    def allows(self, host_header: str | None) -> bool:
        if host_header is None:
            return False
        name = host_name(host_header)
        if name in LOOPBACK_NAMES or name in self.allowed_hosts:
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False


def host_name(host_header: str) -> str:
    """`LocalHost.:8000` -> `localhost`, `[::1]:8000` -> `::1`."""
    value = host_header.strip().lower()
    if value.startswith("["):
        value = value[1:].partition("]")[0]
    elif value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


def is_loopback_host(host: str) -> bool:
    name = host_name(host) if host.startswith("[") else host.lower()
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class HeaderLimit:
    """431 for a header block over the limit; uvicorn's parser refuses twice that much itself."""

    def __init__(self, app: ASGIApp, max_header_bytes: int) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = sum(len(name) + len(value) + 4 for name, value in scope["headers"])
            if size > self.max_header_bytes:
                error = HeadersTooLargeError(
                    f"The request headers take {size} bytes; at most {self.max_header_bytes} "
                    "are accepted."
                )
                await _refuse(error, scope, receive, send)
                return
        await self.app(scope, receive, send)


class HostGuard:
    """Refuses requests whose Host is not allowed: a web page that rebinds its own name to
    127.0.0.1 still sends its own name as Host."""

    def __init__(self, app: ASGIApp, policy: HostPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not self.policy.allows(_header(scope, b"host")):
            error = InvalidRequestError(
                "The Host header names a host this server does not answer for; "
                "add it with --allowed-host.",
                code="invalid_host",
            )
            await _refuse(error, scope, receive, send)
            return
        await self.app(scope, receive, send)


class ApiKeyGuard:
    """`Authorization: Bearer KEY` or `x-api-key: KEY` on every path but PUBLIC_PATHS: /health
    and the pages (/, /docs and their files)."""

    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...]) -> None:
        self.app = app
        self.keys = tuple(key.encode("ascii") for key in api_keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" or get_route_path(scope) in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        presented = _presented_key(scope)
        if presented is None:
            error = AuthenticationError(
                "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'."
            )
            await _refuse(error, scope, receive, send)
        elif not self._accepts(presented):
            await _refuse(AuthenticationError("Incorrect API key provided."), scope, receive, send)
        else:
            scope[OWNER_KEY] = owner_of(presented)
            await self.app(scope, receive, send)

    def _accepts(self, presented: bytes) -> bool:
        """Constant time: every key is compared, whatever matched before."""
        matched = False
        for key in self.keys:
            matched |= hmac.compare_digest(presented, key)
        return matched


def _presented_key(scope: Scope) -> bytes | None:
    """A Bearer token, else `x-api-key` (Anthropic's clients); b"" for another scheme alone."""
    authorization = _raw_header(scope, b"authorization")
    if authorization is not None:
        scheme, _, token = authorization.strip().partition(b" ")
        if scheme.lower() == b"bearer" and token.strip():
            return token.strip()
    api_key = _raw_header(scope, b"x-api-key")
    if api_key is not None:
        return api_key.strip()
    return None if authorization is None else b""


def _raw_header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


def _header(scope: Scope, name: bytes) -> str | None:
    value = _raw_header(scope, name)
    return None if value is None else value.decode("latin-1")


async def _refuse(error: APIError, scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    response = error_response(error, dialect_of(scope))
    if isinstance(error, AuthenticationError):
        response.headers["WWW-Authenticate"] = "Bearer"
    await response(scope, receive, send)


def request_owner(scope: Scope) -> str:
    """Whose stored state a request may read: its key's owner id, or the one owner without keys."""
    owner = scope.get(OWNER_KEY)
    return owner if isinstance(owner, str) else NO_OWNER


def dialect_of(scope: Scope) -> ErrorDialect:
    return _dialects(scope).of(scope)


def _dialects(scope: Scope) -> Dialects:
    """The app's route table of dialects (middleware runs before routing, but the app is set)."""
    app = scope.get("app")
    dialects = getattr(getattr(app, "state", None), "dialects", None)
    return dialects if isinstance(dialects, Dialects) else Dialects()
