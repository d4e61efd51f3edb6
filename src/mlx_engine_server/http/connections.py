"""Connection limits uvicorn lacks: a deadline for a request's headers, one for each piece of
its body, and a cap on open connections, so stalled clients cannot hold every file descriptor.

uvicorn (0.55) closes idle keep-alive connections, but a client that sends half a header block,
or a Content-Length and then nothing, holds its socket forever, and every accepted socket is
kept: 2,100 stalled connections exhausted the open-file limit and /health hung. The protocol
below is uvicorn's h11 one with timers. At the cap, the connection that has waited longest for
its headers makes room (a stalled one, most likely), so a flood of idle sockets cannot lock out
a client that talks; only when every connection is busy with a request is the new one refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import resource
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, ClassVar, Literal, cast

from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

from ..errors import APIError, ErrorDialect, RequestTimeoutError, ServiceUnavailableError
from .errors import OPENAI
from .guards import dialect_of

logger = logging.getLogger(__name__)

TIMED_OUT_KEY = "mlx_engine_server.timed_out"  # in the scope of a request whose body stalled
Phase = Literal["headers", "body", "busy"]
FILES_BESIDES_CONNECTIONS = 128  # the model's files, the engine's pipes, listeners, logs


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 30.0
    body_timeout_s: float = 60.0
    max_connections: int = 512
    cors_origins: frozenset[str] = frozenset()  # --cors-origin: they may read our refusals too


def fit_open_file_limit(limits: ConnectionLimits) -> ConnectionLimits:
    """Raise the process's open-file limit to hold the connection cap (macOS starts at 256,
    Linux at 1024); where the hard limit forbids, lower the cap instead, and say so."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = limits.max_connections + FILES_BESIDES_CONNECTIONS
    if soft != resource.RLIM_INFINITY and soft < needed:
        wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return limits
    fitted = max(1, soft - FILES_BESIDES_CONNECTIONS)
    logger.warning(
        "the open-file limit is %d: at most %d client connections, not %d",
        soft,
        fitted,
        limits.max_connections,
    )
    return dataclasses.replace(limits, max_connections=fitted)


def guarded_h11(limits: ConnectionLimits) -> type[H11Protocol]:
    """uvicorn's `http=` argument: its h11 protocol with these limits."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})


class GuardedH11Protocol(H11Protocol):
    """H11Protocol plus one timer per connection, armed for the phase it is in: waiting for
    headers (deadline from the connection's start or the previous response's end), reading a
    body (deadline from the last piece received), or busy with the app (no deadline)."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._timer: asyncio.TimerHandle | None = None
        self._watched: tuple[Phase, RequestResponseCycle | None] | None = None
        self.waiting_since = self.loop.time()
        self.heard_from = False
        super().connection_made(transport)  # type: ignore[arg-type]
        if len(self.connections) > self.limits.max_connections and not self._make_room():
            error = ServiceUnavailableError(
                "The server has as many open connections as it accepts; try again shortly.",
                code="too_many_connections",
            )
            self._answer_and_close(error, cors=self._cors_for(None))
            return
        self._watch(data_arrived=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.phase() == "headers":
            self.heard_from = True  # part of a header block: it gets a 408, not silence
        self._watch(data_arrived=True)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch(data_arrived=False)

    def phase(self) -> Phase:
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return "headers"
        return "body" if cycle.more_body and not cycle.disconnected else "busy"

    def _watch(self, *, data_arrived: bool) -> None:
        """(Re)arm the timer when the phase changed, or when a body's next piece came."""
        if self.transport.is_closing():
            return
        phase = self.phase()
        watched = (phase, self.cycle)
        if watched == self._watched and not (phase == "body" and data_arrived):
            return
        self._watched = watched
        self._cancel_timer()
        if phase == "headers":
            self.waiting_since = self.loop.time()
            self.heard_from = False
            self._timer = self.loop.call_later(self.limits.header_timeout_s, self._headers_late)
        elif phase == "body":
            self._timer = self.loop.call_later(self.limits.body_timeout_s, self._body_late)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_late(self) -> None:
        if not self.heard_from:  # an idle connection, as uvicorn closes idle keep-alive ones
            self.transport.close()
            return
        error = RequestTimeoutError(
            f"The request headers did not arrive within {self.limits.header_timeout_s:g} s."
        )
        self._answer_and_close(error, cors=self._cors_for(None))

    def _body_late(self) -> None:
        """The app is waiting for the body: it sees the client leave, and logs a 408."""
        cycle = self.cycle
        if cycle is not None:
            self.scope[TIMED_OUT_KEY] = True  # type: ignore[literal-required]
            cycle.disconnected = True  # the app's answer goes nowhere: ours below is sent
            cycle.message_event.set()
        error = RequestTimeoutError(
            f"The request body stalled for {self.limits.body_timeout_s:g} s."
        )
        # The route is known by now: an Anthropic client gets its own error shape.
        if cycle is None:
            self._answer_and_close(error, cors=self._cors_for(None))
            return
        scope = cast("dict[str, Any]", self.scope)
        self._answer_and_close(error, dialect_of(scope), self._cors_for(_origin_of(scope)))

    def _cors_for(self, origin: str | None) -> str:
        """The CORS header lines of a refusal, as the app's CORS middleware would write them.
        Before a header block has been read there is no Origin to answer: only `*` applies."""
        allowed = self.limits.cors_origins
        if "*" in allowed:
            return "access-control-allow-origin: *\r\n"
        if origin is not None and origin in allowed:
            return f"access-control-allow-origin: {origin}\r\nvary: Origin\r\n"
        return ""

    def _make_room(self) -> bool:
        """Close the connection that has waited longest for a request's headers, if any."""
        idle = [
            connection
            for connection in self.connections
            if isinstance(connection, GuardedH11Protocol)
            and connection is not self
            and connection.phase() == "headers"
            and not connection.transport.is_closing()
        ]
        if not idle:
            return False
        oldest = min(idle, key=lambda connection: connection.waiting_since)
        oldest._cancel_timer()
        oldest.transport.close()
        return True

    def _answer_and_close(
        self, error: APIError, dialect: ErrorDialect = OPENAI, cors: str = ""
    ) -> None:
        """A whole response written straight to the socket (h11 will not start one before a
        request has arrived), then the connection closed."""
        self._cancel_timer()
        if self.transport.is_closing():
            return
        body = json.dumps(dialect.body(error)).encode()
        status = HTTPStatus(dialect.status(error))
        head = (
            f"HTTP/1.1 {status.value} {status.phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{cors}connection: close\r\n\r\n"
        )
        self.transport.write(head.encode("ascii") + body)
        self.transport.close()


def _origin_of(scope: dict[str, Any]) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"origin":
            return str(value.decode("latin-1"))
    return None
