"""One request's events on the HTTP side: what EngineClient.generate hands the handler.

EngineClient routes each step's events here, one hand-over per event loop; the Generation queues
them on the request's loop, waits for admission, merges text deltas that are already waiting, and
times the first and later tokens.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol

from .messages import Admitted, Event, Failed, Finished, TextDelta

if TYPE_CHECKING:
    from .client import EngineClient


class TimingObserver(Protocol):
    def first_token(self, seconds: float) -> None: ...
    def next_token(self, seconds: float) -> None: ...


class Generation:
    """One request's events, read by the handler that made it; cancel() when the client is gone.

    A request may generate several sequences (`n` choices, several prompts): each is a row of the
    batch, and its events arrive tagged with its choice index. Made by EngineClient.generate
    inside the request's coroutine: its asyncio.Queue belongs to that loop.
    """

    def __init__(
        self,
        client: EngineClient,
        request_id: int,
        choices: int,
        timing: TimingObserver | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self._client = client
        self.request_id = request_id
        self.choices = choices
        self.ended: set[int] = set()  # choices whose last event the client has routed
        self._events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self._running = choices
        self._timing = timing
        self._submitted_at = self._last_text_at = time.monotonic()
        self._seen_text = False
        self._admitted: dict[int, int] = {}  # choice index -> prompt tokens found in the cache
        self._early: deque[tuple[int, Event]] = deque()  # read while waiting for admission
        self._cancelled = False
        self.ttft_s: float | None = None
        self._completion_tokens: dict[int, int] = {}  # choice index -> tokens read so far

    @property
    def completion_tokens(self) -> int:
        """Tokens generated for the reader so far: the usage of finished choices, and the
        tokens streamed of the others (a stream cut by shutdown or an error still counts)."""
        return sum(self._completion_tokens.values())

    def put(self, index: int, event: Event) -> None:
        """On the generation's loop: one event from the engine."""
        self._events.put_nowait((index, event))

    @property
    def backlog(self) -> int:
        """Events that arrived and are not read yet."""
        return self._events.qsize() + len(self._early)

    def cancel(self) -> None:
        if not self._cancelled:
            self._cancelled = True
            self._client.cancel(self.request_id)

    def _observe_text(self) -> None:
        now = time.monotonic()
        if self._seen_text:
            if self._timing is not None:
                self._timing.next_token(now - self._last_text_at)
        else:
            self.ttft_s = now - self._submitted_at
            if self._timing is not None:
                self._timing.first_token(self.ttft_s)
            self._seen_text = True
        self._last_text_at = now

    async def admission(self) -> dict[int, int] | Failed:
        """Wait until the worker has started every choice: each one's cached prompt tokens.

        Other events that arrive meanwhile are kept for events(); a failure ends the wait.
        """
        while len(self._admitted) < self.choices:
            index, event = await self._events.get()
            if isinstance(event, Admitted):
                self._admitted[index] = event.cached_tokens
                continue
            self._early.append((index, event))
            if isinstance(event, Failed):
                return event
        return dict(self._admitted)

    async def events(self) -> AsyncIterator[tuple[int, TextDelta | Finished | Failed]]:
        """(choice index, event): text deltas, then one Finished or Failed for every choice.

        Text deltas of one choice that are already waiting come as one: a reader that fell
        behind (a busy event loop, many streams) catches up with one chunk, not one per token.
        """
        while self._running:
            index, event = self._early.popleft() if self._early else await self._events.get()
            if isinstance(event, Admitted):
                self._admitted[index] = event.cached_tokens
                continue
            if isinstance(event, Finished):
                self._completion_tokens[index] = event.usage.completion_tokens
            if isinstance(event, Finished | Failed):
                self._running -= 1
            else:
                self._observe_text()
                event = self._with_waiting_text(index, event)
                streamed = self._completion_tokens.get(index, 0) + len(event.token_ids)
                self._completion_tokens[index] = streamed
            yield index, event

    def _with_waiting_text(self, index: int, delta: TextDelta) -> TextDelta:
        while self._early or not self._events.empty():
            later = self._early.popleft() if self._early else self._events.get_nowait()
            if later[0] != index or not isinstance(later[1], TextDelta):
                self._early.appendleft(later)
                break
            self._observe_text()
            delta = delta.followed_by(later[1])
        return delta
