"""One log line per request, with a request id the client sees in `X-Request-ID`, and again in
`Request-Id`: the header Anthropic's SDK reads (`request_id` of its answers and errors).

A sane incoming `X-Request-ID` (a proxy's) is kept, so one id follows a request through every
hop; anything else is replaced by a fresh one. Prompt text is logged only with --log-prompts.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .connections import TIMED_OUT_KEY

logger = logging.getLogger("mlx_engine_server.access")

REQUEST_ID_HEADER = "x-request-id"
ANTHROPIC_REQUEST_ID_HEADER = "request-id"
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._~:@+=/-]{1,128}")
RECORD_KEY = "mlx_engine_server.record"
HTTP_ERROR_FIRST = 400
ERROR_BODY_MAX_BYTES = 4096  # error bodies are small; a larger one is no error of ours
ERROR_MESSAGE_MAX_CHARS = 300


class GenerationFacts(Protocol):
    """What a finished (or ended) generation tells the log: engine.Generation has these."""

    @property
    def completion_tokens(self) -> int: ...

    ttft_s: float | None


@dataclass
class RequestRecord:
    """Filled in by the handler, written by the middleware once the response has been sent."""

    request_id: str
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    generation: GenerationFacts | None = None
    prompt: str | None = None

    def note_prompt(self, text: str) -> None:
        self.prompt = text

    def note_generation(
        self, prompt_tokens: int, cached_tokens: int, generation: GenerationFacts
    ) -> None:
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = cached_tokens
        self.generation = generation

    def fields(self) -> dict[str, Any]:
        generation = self.generation
        fields: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": generation.completion_tokens if generation else None,
            "cached_tokens": self.cached_tokens,
            "ttft_s": _rounded(generation.ttft_s if generation else None),
        }
        if self.prompt is not None:
            fields["prompt"] = self.prompt
        return fields


CLIENT_CLOSED = 499  # nginx's status for a client that hung up before its answer was sent
REQUEST_TIMEOUT = int(HTTPStatus.REQUEST_TIMEOUT)  # its body stalled: connections.py answered


class Exchange:
    """One request's ASGI messages as they pass: the status sent, whether the response ended,
    and whether the client hung up first (then the status is CLIENT_CLOSED, whatever was sent:
    nobody read it, and it was no fault of the server's)."""

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        self.sent_status = 500
        self.response_done = False
        self.client_left = False
        self._receive = receive
        self._send = send

    @property
    def status(self) -> int:
        if self.scope.get(TIMED_OUT_KEY):
            return REQUEST_TIMEOUT
        return CLIENT_CLOSED if self.client_left else self.sent_status

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.disconnect" and not self.response_done:
            self.client_left = True
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.sent_status = message["status"]
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.response_done = True
        try:
            await self._send(message)
        except OSError:
            self.client_left = not self.response_done
            raise


def request_record(request: Request) -> RequestRecord | None:
    record = request.scope.get(RECORD_KEY)
    return record if isinstance(record, RequestRecord) else None


class RequestLog:
    """Pure ASGI middleware: the outermost one, so refusals by the others are logged too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord(request_id=_request_id(scope))
        scope[RECORD_KEY] = record
        started = time.monotonic()
        exchange = Exchange(scope, receive, send)
        error_body = bytearray()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = headers[ANTHROPIC_REQUEST_ID_HEADER] = (
                    record.request_id
                )
            elif (
                message["type"] == "http.response.body" and exchange.sent_status >= HTTP_ERROR_FIRST
            ):
                room = ERROR_BODY_MAX_BYTES - len(error_body)
                error_body.extend(message.get("body", b"")[: max(room, 0)])
            await exchange.send(message)

        try:
            await self.app(scope, exchange.receive, send_with_id)
        finally:
            self._write(scope, record, exchange.status, bytes(error_body), started)

    @staticmethod
    def _write(
        scope: Scope, record: RequestRecord, status: int, error_body: bytes, started: float
    ) -> None:
        fields = {
            "request_id": record.request_id,
            "method": scope["method"],
            "path": scope["path"],
            "client": _client_host(scope),
            "status": status,
            **record.fields(),
            **_error_fields(error_body),
            "duration_s": _rounded(time.monotonic() - started),
        }
        logger.info("%s %s %d", scope["method"], scope["path"], status, extra={"fields": fields})


def _client_host(scope: Scope) -> str | None:
    """The peer's address, or the one a trusted proxy named (--forwarded-allow-ips)."""
    client = scope.get("client")
    return str(client[0]) if client else None


def _error_fields(body: bytes) -> dict[str, str | None]:
    """Why a request was refused, from its error body (every error leaves as JSON whose
    `error` holds a code or type, and a message: OpenAI's shape and Anthropic's)."""
    if not body:
        return {}
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return {}
    if not isinstance(error, dict):
        return {}
    code = error.get("code") or error.get("type")
    message = error.get("message")
    return {
        "error_code": str(code) if code is not None else None,
        "error_message": str(message)[:ERROR_MESSAGE_MAX_CHARS] if message is not None else None,
    }


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER.encode():
            candidate: str = value.decode("latin-1")
            if SANE_REQUEST_ID.fullmatch(candidate):
                return candidate
            break
    return uuid.uuid4().hex


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 4)
