"""The one place that renders errors: every failure leaves as OpenAI's error JSON."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import (
    APIError,
    InternalError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
)

logger = logging.getLogger(__name__)


def error_response(error: APIError) -> JSONResponse:
    headers = {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(error.retry_after_s)
    if isinstance(error, InternalError):
        headers["x-should-retry"] = "false"  # a bug does not go away on retry
    return JSONResponse(error.to_body(), status_code=error.status_code, headers=headers)


async def on_api_error(request: Request, exc: Exception) -> Response:
    return error_response(exc if isinstance(exc, APIError) else InternalError(str(exc)))


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
    response = error_response(error)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


async def on_unexpected_error(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(InternalError("The server hit an internal error; see its log."))


EXCEPTION_HANDLERS: Mapping[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
    APIError: on_api_error,
    HTTPException: on_http_exception,
    Exception: on_unexpected_error,
}
