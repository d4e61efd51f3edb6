"""Streaming and collecting a generation: OpenAI's SSE chunk sequence, ending in `data: [DONE]`.

The engine is told to drop a request when its response ends for any reason (finished, client
gone, server stopping), through the response object's own lifetime, not the event iterator's.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.event import ensure_bytes
from starlette.types import Receive, Scope, Send

from ..chat.output import Content, OutputRules, OutputSplitter, Part, Reasoning
from ..engine import Failed, Finished, Generation, TextDelta, Usage
from ..errors import APIError, GenerationTimeoutError, InternalError, ServiceUnavailableError
from ..protocols.openai.render import (
    ChoiceResult,
    ResponseHeader,
    chat_chunk,
    chat_finish_reason,
    chat_logprobs,
    chat_usage_chunk,
    reasoning_fields,
    text_chunk,
    text_logprobs,
    text_usage_chunk,
    tool_call_deltas,
)

DONE = "[DONE]"
SHUTDOWN_MARGIN_S = 2.0
PING_INTERVAL_S = 15
SEPARATOR = "\n"


class ChunkShape(Protocol):
    include_usage: bool

    def opening(self, index: int) -> dict[str, Any] | None: ...
    def deltas(self, index: int, delta: TextDelta) -> list[dict[str, Any]]: ...
    def closing(self, index: int, finish: str) -> list[dict[str, Any]]: ...
    def usage(self, usage: Usage) -> dict[str, Any]: ...


class ChatShape:
    """Chat chunks: each choice's text split into reasoning, content and tool-call deltas."""

    def __init__(
        self,
        head: ResponseHeader,
        include_usage: bool,
        with_logprobs: bool,
        rules: OutputRules,
        summary: Usage | None = None,
    ) -> None:
        self.head = head
        self.include_usage = include_usage
        self.with_logprobs = with_logprobs
        self.summary = summary
        self._rules = rules
        self._splitters: dict[int, OutputSplitter] = {}

    def opening(self, index: int) -> dict[str, Any] | None:
        return self._chunk(index, {"role": "assistant", "content": ""})

    def deltas(self, index: int, delta: TextDelta) -> list[dict[str, Any]]:
        chunks = self._part_chunks(index, self._splitter(index).feed(delta.text))
        if self.with_logprobs and delta.logprobs:
            # Logprobs travel with the first chunk of their text; text held back (it may be
            # the start of a tool-call marker) leaves them on an empty content delta.
            if not chunks:
                chunks = [self._chunk(index, {"content": ""})]
            chunks[0]["choices"][0]["logprobs"] = chat_logprobs(delta.logprobs)
        return chunks

    def closing(self, index: int, finish: str) -> list[dict[str, Any]]:
        splitter = self._splitter(index)
        chunks = self._part_chunks(index, splitter.finish())
        reason = chat_finish_reason(finish, made_tool_calls=splitter.made_tool_calls)
        return [*chunks, self._chunk(index, {}, reason)]

    def usage(self, usage: Usage) -> dict[str, Any]:
        return chat_usage_chunk(self.head, usage.with_summary(self.summary))

    def _splitter(self, index: int) -> OutputSplitter:
        if index not in self._splitters:
            self._splitters[index] = OutputSplitter(self._rules)
        return self._splitters[index]

    def _part_chunks(self, index: int, parts: list[Part]) -> list[dict[str, Any]]:
        chunks = []
        for part in parts:
            if isinstance(part, Reasoning):
                chunks.append(self._chunk(index, reasoning_fields(part.text)))
            elif isinstance(part, Content):
                chunks.append(self._chunk(index, {"content": part.text}))
            else:
                chunks.extend(self._chunk(index, delta) for delta in tool_call_deltas(part))
        return chunks

    def _chunk(
        self, index: int, delta: dict[str, Any], finish: str | None = None
    ) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        return chat_chunk(self.head, choice, with_usage_field=self.include_usage)


class TextShape:
    def __init__(
        self,
        head: ResponseHeader,
        include_usage: bool,
        with_logprobs: bool,
        echoes: list[str] | None = None,
    ) -> None:
        self.head = head
        self.include_usage = include_usage
        self.with_logprobs = with_logprobs
        self.echoes = echoes
        self._offsets: dict[int, int] = {}

    def opening(self, index: int) -> dict[str, Any] | None:
        if not self.echoes or not self.echoes[index]:
            return None
        return self._chunk(index, self.echoes[index])

    def deltas(self, index: int, delta: TextDelta) -> list[dict[str, Any]]:
        if not delta.text and not delta.logprobs:
            return []
        logprobs = None
        if self.with_logprobs:
            offset = self._offsets.get(index, 0)
            logprobs = text_logprobs(delta.logprobs, offset)
            self._offsets[index] = offset + sum(len(token) for token in logprobs["tokens"])
        return [self._chunk(index, delta.text, logprobs=logprobs)]

    def closing(self, index: int, finish: str) -> list[dict[str, Any]]:
        return [self._chunk(index, "", finish)]

    def usage(self, usage: Usage) -> dict[str, Any]:
        return text_usage_chunk(self.head, usage)

    def _chunk(
        self,
        index: int,
        text: str,
        finish: str | None = None,
        logprobs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        choice = {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}
        return text_chunk(self.head, choice, with_usage_field=self.include_usage)


class UsageTotal:
    """Usage of a request with several choices: prompts counted once, completions summed."""

    def __init__(self, n: int) -> None:
        self._n = n
        self._prompt_tokens = 0
        self._completion_tokens = 0
        self._cached_tokens = 0

    def add(self, index: int, usage: Usage) -> None:
        self._completion_tokens += usage.completion_tokens
        if index % self._n == 0:  # the first choice of each prompt
            self._prompt_tokens += usage.prompt_tokens
            self._cached_tokens += usage.cached_tokens

    def total(self) -> Usage:
        return Usage(self._prompt_tokens, self._completion_tokens, self._cached_tokens)


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


async def admit(generation: Generation, receive: Receive) -> dict[int, int]:
    """Wait until the worker has started every choice; each one's cached prompt tokens.

    Admission comes before the response's first byte, so a request that can never start is a
    real HTTP error status, not a 200 whose stream then fails.
    """
    watcher = asyncio.create_task(_cancel_on_disconnect(generation, receive))
    try:
        event = await generation.admission()
    except BaseException:
        generation.cancel()
        raise
    finally:
        watcher.cancel()
    if isinstance(event, Failed):
        generation.cancel()
        raise failure_error(event)
    return event


async def collect(
    generation: Generation, receive: Receive, choices: int, n: int
) -> tuple[list[ChoiceResult], Usage]:
    """The whole answer of a non-streaming request: every choice, and the usage of all.

    The engine drops the request when the handler ends early or the client hangs up: nobody
    would read the answer, and its batch slot is worth more to the next request.
    """
    watcher = asyncio.create_task(_cancel_on_disconnect(generation, receive))
    results = [ChoiceResult() for _ in range(choices)]
    usage = UsageTotal(n)
    try:
        async for index, event in generation.events():
            result = results[index]
            if isinstance(event, TextDelta):
                result.text += event.text
                result.logprobs.extend(event.logprobs)
            elif isinstance(event, Finished):
                result.finish_reason = event.finish_reason
                result.stop_sequence = event.stop_sequence
                usage.add(index, event.usage)
            else:
                raise failure_error(event)
    finally:
        watcher.cancel()
        generation.cancel()
    return results, usage.total()


async def _cancel_on_disconnect(generation: Generation, receive: Receive) -> None:
    """The body has been read, so the next ASGI message can only be the client leaving."""
    while (await receive())["type"] != "http.disconnect":
        pass
    generation.cancel()


async def _chunks(
    generation: Generation, shape: ChunkShape, choices: int, n: int
) -> AsyncIterator[dict[str, str]]:
    for index in range(choices):
        opening = shape.opening(index)
        if opening is not None:
            yield _data(opening)
    usage = UsageTotal(n)
    async for index, event in generation.events():
        if isinstance(event, TextDelta):
            for chunk in shape.deltas(index, event):
                yield _data(chunk)
        elif isinstance(event, Finished):
            for chunk in shape.closing(index, event.finish_reason):
                yield _data(chunk)
            usage.add(index, event.usage)
        else:
            generation.cancel()
            yield _data(failure_error(event).to_body())
            break
    else:
        if shape.include_usage:
            yield _data(shape.usage(usage.total()))
    yield {"data": DONE}


def _data(payload: dict[str, Any]) -> dict[str, str]:
    return {"data": json.dumps(payload, ensure_ascii=False, separators=(",", ":"))}


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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._generation.cancel()


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


def stream_response(
    generation: Generation, shape: ChunkShape, shutdown_grace_s: float, choices: int, n: int
) -> GenerationStream:
    """`choices` sequences in all, `n` per prompt."""
    return GenerationStream(generation, _chunks(generation, shape, choices, n), shutdown_grace_s)


class EventShape(Protocol):
    """A protocol's stream (Anthropic Messages, OpenAI Responses) for one choice: the engine's
    text arrives already split into reasoning, content and tool calls."""

    def opening(self) -> list[dict[str, Any]]: ...
    def parts(self, parts: list[Part]) -> list[dict[str, Any]]: ...
    def closing(self, finished: Finished, made_tool_calls: bool) -> list[dict[str, Any]]: ...
    def failure(self, error: APIError) -> list[dict[str, Any]]: ...


async def named_events(
    generation: Generation, shape: EventShape, rules: OutputRules
) -> AsyncIterator[dict[str, str]]:
    """One choice's events as `event: <type>` / `data: {...}` pairs, the type taken from data."""
    splitter = OutputSplitter(rules)
    for payload in shape.opening():
        yield _named(payload)
    async for _, event in generation.events():
        if isinstance(event, TextDelta):
            payloads = shape.parts(splitter.feed(event.text))
        elif isinstance(event, Finished):
            parts = shape.parts(splitter.finish())
            payloads = [*parts, *shape.closing(event, splitter.made_tool_calls)]
        else:
            generation.cancel()
            payloads = shape.failure(failure_error(event))
        for payload in payloads:
            yield _named(payload)


def _named(payload: dict[str, Any]) -> dict[str, str]:
    return {"event": str(payload["type"]), **_data(payload)}
