"""Every error this server reports: start-up failures and OpenAI-shaped API errors.

Imports nothing of ours, so any module may raise these.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class StartupError(Exception):
    """A problem that stops the server from starting (bad model path, bad adapter, bad GGUF).

    The message is shown to the operator as it is: make it say what is wrong and what to do.
    """

    exit_status = 1


class CannotListenError(StartupError):
    """The address to serve on cannot be bound (in use, or not ours); found before the model
    loads, so the operator does not wait for a load that leads nowhere."""

    exit_status = 5


@dataclass(frozen=True)
class ErrorDialect:
    """How one protocol spells an APIError: its body and its status (Anthropic's SDK reads
    `{"type": "error", ...}` and 529 for overload; everything else reads OpenAI's)."""

    body: Callable[[APIError], dict[str, Any]]
    status: Callable[[APIError], int]


class APIError(Exception):
    """An error a client sees as OpenAI's `{"error": {"message", "type", "param", "code"}}`."""

    status_code = 500
    error_type = "server_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.retry_after_s = retry_after_s

    def to_body(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(APIError):
    status_code = 400
    error_type = "invalid_request_error"
    default_code = "invalid_value"


class ContextLengthExceededError(InvalidRequestError):
    default_code = "context_length_exceeded"


class ConflictError(APIError):
    status_code = 409
    error_type = "invalid_request_error"
    default_code = "conflict"


class AuthenticationError(APIError):
    status_code = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(APIError):
    status_code = 403
    error_type = "invalid_request_error"
    default_code = "forbidden"


class NotFoundError(APIError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFoundError(NotFoundError):
    default_code = "model_not_found"


class MethodNotAllowedError(APIError):
    status_code = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"


class RequestTimeoutError(APIError):
    status_code = 408
    error_type = "invalid_request_error"
    default_code = "request_timeout"


class PayloadTooLargeError(APIError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class HeadersTooLargeError(APIError):
    status_code = 431
    error_type = "invalid_request_error"
    default_code = "headers_too_large"


class UnsupportedMediaTypeError(APIError):
    status_code = 415
    error_type = "invalid_request_error"
    default_code = "unsupported_media_type"


class ClientClosedError(APIError):
    """The client hung up before its answer was ready: nobody reads this error (nginx's 499)."""

    status_code = 499
    error_type = "client_closed"
    default_code = "client_closed_request"


class OverloadedError(APIError):
    """The queue is full: say no at once, with Retry-After, instead of timing out."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "queue_full"


class RateLimitError(APIError):
    """A key used its requests or tokens of the minute (--rate-limit-rpm, --rate-limit-tpm)."""

    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class ServiceUnavailableError(APIError):
    status_code = 503
    error_type = "server_error"
    default_code = "service_unavailable"


class StateUnavailableError(ServiceUnavailableError):
    """The state store (SQLite file, Redis server) failed a read or a write."""

    default_code = "state_store_unavailable"


class GenerationTimeoutError(APIError):
    status_code = 504
    error_type = "server_error"
    default_code = "timeout"


class InternalError(APIError):
    """A bug or a failure inside generation: never a client's fault, never retried blindly."""

    status_code = 500
    error_type = "server_error"
    default_code = "internal_error"
