"""Streaming and collecting a generation: OpenAI's SSE chunk sequence, ending in `data: [DONE]`.

The engine is told to drop a request when its response ends for any reason (finished, client
gone, server stopping), through the response object's own lifetime, not the event iterator's.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, Protocol

from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from .chat.output import Content, OutputRules, OutputSplitter, Part, Reasoning
from .engine import Failed, Finished, Generation, TextDelta, Usage
from .errors import APIError, GenerationTimeoutError, InternalError, ServiceUnavailableError
from .responses import (
    ResponseHeader,
    chat_chunk,
    chat_finish_reason,
    chat_usage_chunk,
    reasoning_fields,
    text_chunk,
    text_usage_chunk,
    tool_call_deltas,
)

DONE = "[DONE]"
SHUTDOWN_MARGIN_S = 2.0


class ChunkShape(Protocol):
    include_usage: bool

    def opening(self) -> dict[str, Any] | None: ...
    def deltas(self, text: str) -> list[dict[str, Any]]: ...
    def closing(self, finish: str) -> list[dict[str, Any]]: ...
    def usage(self, usage: Usage) -> dict[str, Any]: ...


class ChatShape:
    """Chat chunks: the raw text split into reasoning, content and tool-call deltas."""

    def __init__(
        self,
        head: ResponseHeader,
        include_usage: bool,
        rules: OutputRules,
        summary: Usage | None = None,
    ) -> None:
        self.head = head
        self.include_usage = include_usage
        self.summary = summary
        self._splitter = OutputSplitter(rules)

    def opening(self) -> dict[str, Any] | None:
        return self._chunk({"role": "assistant", "content": ""})

    def deltas(self, text: str) -> list[dict[str, Any]]:
        return self._part_chunks(self._splitter.feed(text))

    def closing(self, finish: str) -> list[dict[str, Any]]:
        chunks = self._part_chunks(self._splitter.finish())
        made_calls = self._splitter.made_tool_calls
        reason = chat_finish_reason(finish, made_tool_calls=made_calls)
        return [*chunks, self._chunk({}, reason)]

    def _part_chunks(self, parts: list[Part]) -> list[dict[str, Any]]:
        chunks = []
        for part in parts:
            if isinstance(part, Reasoning):
                chunks.append(self._chunk(reasoning_fields(part.text)))
            elif isinstance(part, Content):
                chunks.append(self._chunk({"content": part.text}))
            else:
                chunks.extend(self._chunk(delta) for delta in tool_call_deltas(part))
        return chunks

    def usage(self, usage: Usage) -> dict[str, Any]:
        return chat_usage_chunk(self.head, usage.with_summary(self.summary))

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return chat_chunk(self.head, delta, finish, with_usage_field=self.include_usage)


class TextShape:
    def __init__(
        self, head: ResponseHeader, include_usage: bool, summary: Usage | None = None
    ) -> None:
        self.head = head
        self.include_usage = include_usage
        self.summary = summary

    def opening(self) -> dict[str, Any] | None:
        return None

    def deltas(self, text: str) -> list[dict[str, Any]]:
        return [text_chunk(self.head, text, with_usage_field=self.include_usage)]

    def closing(self, finish: str) -> list[dict[str, Any]]:
        return [text_chunk(self.head, "", finish, with_usage_field=self.include_usage)]

    def usage(self, usage: Usage) -> dict[str, Any]:
        return text_usage_chunk(self.head, usage.with_summary(self.summary))


def failure_error(event: Failed) -> APIError:
    if event.kind == "timeout":
        return GenerationTimeoutError(f"Generation stopped: {event.message}.")
    if event.kind == "shutdown":
        return ServiceUnavailableError(f"Generation stopped: {event.message}.")
    if event.kind == "memory":
        return ServiceUnavailableError(
            f"Not started: {event.message}.", code="insufficient_memory", param="max_tokens"
        )
    return InternalError(f"Generation failed: {event.message}.")


async def collect(generation: Generation, receive: Receive) -> tuple[str, Finished]:
    """The whole answer of a non-streaming request.

    The engine drops the request when the handler ends early or the client hangs up: nobody
    would read the answer, and its batch slot is worth more to the next request.
    """
    watcher = asyncio.create_task(_cancel_on_disconnect(generation, receive))
    pieces: list[str] = []
    try:
        async for event in generation.events():
            if isinstance(event, TextDelta):
                pieces.append(event.text)
            elif isinstance(event, Finished):
                return "".join(pieces), event
            else:
                raise failure_error(event)
    finally:
        watcher.cancel()
        generation.cancel()
    raise InternalError("The generation ended without a result.")


async def _cancel_on_disconnect(generation: Generation, receive: Receive) -> None:
    """The body has been read, so the next ASGI message can only be the client leaving."""
    while (await receive())["type"] != "http.disconnect":
        pass
    generation.cancel()


async def _chunks(generation: Generation, shape: ChunkShape) -> AsyncIterator[dict[str, str]]:
    opening = shape.opening()
    if opening is not None:
        yield _data(opening)
    async for event in generation.events():
        if isinstance(event, TextDelta):
            for chunk in shape.deltas(event.text):
                yield _data(chunk)
        elif isinstance(event, Finished):
            for chunk in shape.closing(event.finish_reason):
                yield _data(chunk)
            if shape.include_usage:
                yield _data(shape.usage(event.usage))
        else:
            yield _data(failure_error(event).to_body())
    yield {"data": DONE}


def _data(payload: dict[str, Any]) -> dict[str, str]:
    return {"data": json.dumps(payload, ensure_ascii=False, separators=(",", ":"))}


class GenerationStream(EventSourceResponse):
    """An SSE response that cancels its generation however the response ends."""

    def __init__(self, generation: Generation, shape: ChunkShape, shutdown_grace_s: float) -> None:
        # On SIGTERM the engine ends what is still running after its grace period with an
        # error event; sse-starlette must not cut the stream before that event is sent.
        super().__init__(
            _chunks(generation, shape),
            sep="\n",
            ping=15,
            shutdown_grace_period=shutdown_grace_s + SHUTDOWN_MARGIN_S,
        )
        self._generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._generation.cancel()


def stream_response(
    generation: Generation, shape: ChunkShape, shutdown_grace_s: float
) -> GenerationStream:
    return GenerationStream(generation, shape, shutdown_grace_s)
