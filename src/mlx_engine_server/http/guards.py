"""Guards in front of the routes: header size, the Host allow-list (DNS rebinding), the web
origins allowed to call (cross-site requests), API keys.

All are pure ASGI middleware that look only at the ASGI scope: the path the router will match
(never a URL rebuilt from the Host header) and the raw headers. Every path needs a key except
the ones in PUBLIC_PATHS, matched exactly as the router matches them, so no other spelling of a
path (`//v1/models`, `/v1/models/`, `%2F`, a root-path prefix) can skip the check.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
from dataclasses import dataclass
from http import HTTPStatus

from starlette._utils import get_route_path  # the router's own path: the one it routes by
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import (
    APIError,
    AuthenticationError,
    ErrorDialect,
    HeadersTooLargeError,
    InvalidRequestError,
    PermissionDeniedError,
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
        authority = None if host_header is None else parse_authority(host_header)
        if authority is None:
            return False
        name = authority[0]
        return name in self.allowed_hosts or is_loopback_name(name)


# RFC 9110 Host: uri-host [ ":" port ]; a bracketed IPv6 literal or a name of DNS characters.
AUTHORITY = re.compile(
    r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9_.-]+))(?::(?P<port>\d{1,5}))?"
)
MAX_PORT = 65535


def parse_authority(value: str) -> tuple[str, int | None] | None:
    """`LocalHost.:8000` -> ("localhost", 8000), `[::1]` -> ("::1", None); None when the value
    is not exactly one host and an optional port (`[::1`, `[::1]evil.com`, `localhost:abc`)."""
    match = AUTHORITY.fullmatch(value.strip())
    if match is None:
        return None
    port = int(match["port"]) if match["port"] is not None else None
    if port is not None and port > MAX_PORT:
        return None
    if match["ipv6"] is not None:
        try:
            return str(ipaddress.IPv6Address(match["ipv6"])), port
        except ValueError:
            return None
    name = match["name"].lower().rstrip(".")
    return (name, port) if name else None


def is_loopback_name(name: str) -> bool:
    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_loopback_host(host: str) -> bool:
    """The address to bind (`127.0.0.1`, `::1`, `[::1]`, `localhost`) is a loopback one."""
    authority = parse_authority(host if ":" not in host.strip("[]") else f"[{host.strip('[]')}]")
    return authority is not None and is_loopback_name(authority[0])


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


DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class OriginPolicy:
    """Which web pages may call the API from a browser: the configured CORS origins and pages
    this server serves itself (an Origin naming the Host the request was sent to)."""

    cors_origins: frozenset[str] = frozenset()

    def allows(self, origin: str, *hosts: str | None) -> bool:
        """`hosts`: the Host header and the proxy's X-Forwarded-Host, where they are given."""
        if "*" in self.cors_origins or origin in self.cors_origins:
            return True
        return any(host is not None and is_same_origin(origin, host) for host in hosts)


def is_same_origin(origin: str, host_header: str) -> bool:
    """`http://127.0.0.1:8000` sent with `Host: 127.0.0.1:8000`; default ports may be left out."""
    scheme, separator, authority = origin.partition("://")
    default_port = DEFAULT_PORTS.get(scheme.lower())
    if not separator or default_port is None:
        return False  # `null` (sandboxed pages, file://) and other schemes are no origin of ours
    page = parse_authority(authority)
    host = parse_authority(host_header)
    if page is None or host is None:
        return False
    return page[0] == host[0] and (page[1] or default_port) == (host[1] or default_port)


class OriginGuard:
    """403 for a request a web page of another origin sent: a "simple" cross-site POST needs no
    CORS preflight, so without this any page the user visits could drive generation."""

    def __init__(self, app: ASGIApp, policy: OriginPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        origin = _header(scope, b"origin") if scope["type"] == "http" else None
        if origin is not None and not self.policy.allows(
            origin, _header(scope, b"host"), _forwarded_host(scope)
        ):
            error = PermissionDeniedError(
                f"Requests from the web origin {origin!r} are not allowed; the operator can "
                "allow it with --cors-origin.",
                code="origin_not_allowed",
            )
            await _refuse(error, scope, receive, send)
            return
        await self.app(scope, receive, send)


class Cors(CORSMiddleware):
    """Starlette's CORS, with a refused preflight answered in the error shape of every other
    refusal (Starlette's is text/plain)."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < HTTPStatus.BAD_REQUEST:
            return response
        reason = bytes(response.body).decode("utf-8", "replace")
        error = InvalidRequestError(
            f"{reason}: this preflight asks for more than the server allows.",
            code="cors_preflight_refused",
        )
        refusal = error_response(error)
        for name, value in response.headers.items():
            if name.lower().startswith("access-control-"):
                refusal.headers[name] = value
        return refusal


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


def _forwarded_host(scope: Scope) -> str | None:
    """The Host a proxy was sent (its first hop): a page served through the proxy is ours too.
    Trusting it is safe against web pages: one of another origin cannot add this header without
    a CORS preflight, and the preflight carries its Origin, which is refused."""
    value = _header(scope, b"x-forwarded-host")
    return None if value is None else value.split(",")[0].strip()


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
