"""Admission and collection, the same for every protocol: a request is admitted to the engine
before its response's first byte (one that cannot start is a real HTTP error status), and a
non-streaming answer is collected whole. Either way the engine drops the request when the client
hangs up: nobody would read the answer, and its batch slot is worth more to the next request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from ..engine import Failed, Finished, Generation, TextDelta, TokenLogprob, Usage
from ..errors import (
    APIError,
    ClientClosedError,
    GenerationTimeoutError,
    InternalError,
    ServiceUnavailableError,
)

# ASGI's receive channel, as the HTTP front hands it over: here only to notice a disconnect.
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


@dataclass
class ChoiceResult:
    """One choice of a whole (non-streamed) answer."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str = "stop"
    stop_sequence: str | None = None  # the `stop` string that ended it, if one did


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
    if event.kind == "cancelled":
        return ClientClosedError("The client hung up; its generation was stopped.")
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
