"""Sending a generation as server-sent events: the response cancels its generation however it
ends (finished, client gone, server stopping), through the response object's own lifetime, not
the event iterator's; events already waiting go out in one write.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.event import ensure_bytes
from starlette.types import Receive, Scope, Send

from ..engine import Generation

SHUTDOWN_MARGIN_S = 2.0
PING_INTERVAL_S = 15
SEPARATOR = "\n"


class GenerationStream(EventSourceResponse):
    """An SSE response that cancels its generation however the response ends.

    `events` are sse-starlette's dicts (`data`, and `event` for protocols that name their events);
    `ping` makes the keep-alive a protocol's own event rather than an SSE comment.
    """

    def __init__(
        self,
        generation: Generation,
        events: AsyncIterator[dict[str, str]],
        shutdown_grace_s: float,
        ping: Callable[[], ServerSentEvent] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        # sse-starlette also sends `X-Accel-Buffering: no`, so nginx passes events at once.
        # On SIGTERM the engine ends what is still running after its grace period with an
        # error event; sse-starlette must not cut the stream before that event is sent.
        super().__init__(
            _coalesced(generation, events),
            sep=SEPARATOR,
            ping=PING_INTERVAL_S,
            ping_message_factory=ping,
            shutdown_grace_period=shutdown_grace_s + SHUTDOWN_MARGIN_S,
        )
        self._generation = generation
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._generation.cancel()
            if self._on_close is not None:
                self._on_close()


async def _coalesced(
    generation: Generation, events: AsyncIterator[dict[str, str]]
) -> AsyncIterator[bytes]:
    """Events already waiting go out in one write: a stream that fell behind (a busy event loop,
    many streams) catches up with one send instead of one per token. Alone, each event is sent
    as soon as it arrives."""
    async for first in events:
        payload = [ensure_bytes(first, SEPARATOR)]
        while generation.backlog:
            try:
                payload.append(ensure_bytes(await anext(events), SEPARATOR))
            except StopAsyncIteration:
                break
        yield b"".join(payload)
