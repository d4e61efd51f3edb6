"""The one place that renders errors: every failure leaves as JSON in its route's dialect
(OpenAI's unless the route table says otherwise), from the routes, the router and the guards."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any

from starlette._utils import get_route_path  # the router's own path: the one it routes by
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import Scope

from ..errors import (
    APIError,
    ClientClosedError,
    ErrorDialect,
    InternalError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
)

logger = logging.getLogger(__name__)


OPENAI = ErrorDialect(body=lambda error: error.to_body(), status=lambda error: error.status_code)


class Dialects:
    """Which dialect each path speaks: a route's path and every path below it (a mistyped
    `/v1/messages/...` still answers an Anthropic client in its own shape); OpenAI elsewhere.
    `by_header`: paths both protocols define (`/v1/models`), where a request header names the
    client's dialect (Anthropic's SDK always sends `anthropic-version`)."""

    def __init__(
        self,
        by_path: Mapping[str, ErrorDialect] | None = None,
        by_header: Mapping[str, tuple[str, ErrorDialect]] | None = None,
    ) -> None:
        self._by_path = dict(by_path or {})
        self._by_header = dict(by_header or {})

    def of(self, scope: Scope) -> ErrorDialect:
        path = get_route_path(scope)
        for prefix, dialect in self._by_path.items():
            if _is_under(path, prefix):
                return dialect
        for prefix, (header, dialect) in self._by_header.items():
            if _is_under(path, prefix) and _has_header(scope, header):
                return dialect
        return OPENAI


def _is_under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def _has_header(scope: Scope, name: str) -> bool:
    wanted = name.lower().encode("latin-1")
    return any(key == wanted for key, _ in scope["headers"])


def error_response(error: APIError, dialect: ErrorDialect = OPENAI) -> JSONResponse:
    headers = {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(error.retry_after_s)
    if isinstance(error, InternalError):
        headers["x-should-retry"] = "false"  # a bug does not go away on retry
    body, status = dialect.body(error), dialect.status(error)
    return JSONResponse(body, status_code=status, headers=headers)


def _dialect(request: Request) -> ErrorDialect:
    dialects: Dialects | None = getattr(request.app.state, "dialects", None)
    return dialects.of(request.scope) if dialects is not None else OPENAI


async def on_api_error(request: Request, exc: Exception) -> Response:
    error = exc if isinstance(exc, APIError) else InternalError(str(exc))
    return error_response(error, _dialect(request))


async def on_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 and 405 (unknown path, wrong method), in OpenAI's shape."""
    if not isinstance(exc, HTTPException):
        return await on_unexpected_error(request, exc)
    error: APIError
    if exc.status_code == HTTPStatus.NOT_FOUND:
        error = NotFoundError(f"Unknown path: {request.url.path}", code="unknown_url")
    elif exc.status_code == HTTPStatus.METHOD_NOT_ALLOWED:
        error = MethodNotAllowedError(f"Method {request.method} is not allowed on this path")
    else:
        error = InvalidRequestError(str(exc.detail), code=None)
        error.status_code = exc.status_code
    response = error_response(error, _dialect(request))
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def on_client_gone(request: Request, exc: Exception) -> Response:
    """The client hung up while its body was being read: nobody reads the answer, and it is no
    server error (no traceback)."""
    return error_response(
        ClientClosedError("The client closed the connection before sending its whole body.")
    )


async def on_unexpected_error(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    error = InternalError("The server hit an internal error; see its log.")
    return error_response(error, _dialect(request))


EXCEPTION_HANDLERS: Mapping[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
    APIError: on_api_error,
    HTTPException: on_http_exception,
    ClientDisconnect: on_client_gone,
    Exception: on_unexpected_error,
}
