"""A generation's engine events turned into a protocol's stream payloads: OpenAI's chunks for
several choices (`openai_events`), or one choice's named events (Anthropic, Responses).
The payloads are sse-starlette's dicts; http/sse.py sends them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from ..chat.output import OutputRules, OutputSplitter, Part
from ..engine import Finished, Generation, TextDelta, TokenLogprob, Usage
from ..errors import APIError
from .admission import UsageTotal, failure_error

DONE = "[DONE]"


class ChunkShape(Protocol):
    include_usage: bool

    def opening(self, index: int) -> dict[str, Any] | None: ...
    def deltas(self, index: int, delta: TextDelta) -> list[dict[str, Any]]: ...
    def closing(self, index: int, finish: str) -> list[dict[str, Any]]: ...
    def usage(self, usage: Usage) -> dict[str, Any]: ...


async def openai_events(
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


class EventShape(Protocol):
    """A protocol's stream (Anthropic Messages, OpenAI Responses) for one choice: the engine's
    text arrives already split into reasoning, content and tool calls."""

    def opening(self) -> list[dict[str, Any]]: ...
    def parts(
        self, parts: list[Part], logprobs: Sequence[TokenLogprob] = ()
    ) -> list[dict[str, Any]]: ...
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
            payloads = shape.parts(splitter.feed(event.text), event.logprobs)
        elif isinstance(event, Finished):
            parts = shape.parts(splitter.finish(cut_off=event.finish_reason == "length"))
            payloads = [*parts, *shape.closing(event, splitter.made_tool_calls)]
        else:
            generation.cancel()
            payloads = shape.failure(failure_error(event))
        for payload in payloads:
            yield _named(payload)


def _named(payload: dict[str, Any]) -> dict[str, str]:
    return {"event": str(payload["type"]), **_data(payload)}
