"""The engine's face to the HTTP side: start and stop the worker, admit requests, stream events.

Admission is decided here, before any response byte: a full queue is a 429 at once.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from ..errors import InvalidRequestError, OverloadedError, ServiceUnavailableError, StartupError
from ..models.loader import LoadedModel
from ..models.vision import VisionPrompt, prepare_vision_prompt
from .device import apply_backend_defaults
from .distributed.group import Group, GroupInfo, end_process
from .distributed.workers import FollowerWorker, GroupWorker, LeaderWorker
from .messages import (
    Admitted,
    Cancellation,
    EngineOptions,
    EngineStats,
    Event,
    Failed,
    Finished,
    SamplingParams,
    TextDelta,
)
from .prefix_cache import PrefixCacheStats
from .worker import STOP, Drain, Submission, Worker, run_worker_thread

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1
FAILURE_FLUSH_S = 1.0  # rank 0 of a failed group: time for the error events to reach clients
DRAIN_BACKSTOP_S = 1.0  # within sse.SHUTDOWN_MARGIN_S, so the error event goes out first

SequenceRequest = tuple[list[int], SamplingParams, Callable[[Event], None]]


class Engine:
    def __init__(
        self,
        load: Callable[[], LoadedModel],
        options: EngineOptions,
        group: Group | None = None,
    ) -> None:
        self._load = load
        self.options = options
        self.group = group
        self._failure: str | None = None
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._worker: Worker | None = None
        self._thread: threading.Thread | None = None
        self._draining = False
        self.started_at = time.time()

    @property
    def capacity(self) -> int:
        return self.options.max_batch_size + self.options.max_queue

    def start(self) -> LoadedModel:
        """Load the model on the worker thread and wait for it; raise StartupError on failure."""
        outcome: list[Worker | BaseException] = []
        loaded = threading.Event()

        def ready(result: Worker | BaseException) -> None:
            outcome.append(result)
            loaded.set()

        apply_backend_defaults()
        self._thread = run_worker_thread(self._load, self._make_worker, ready)
        loaded.wait()
        result = outcome[0]
        if isinstance(result, BaseException):
            # Let the thread release its MLX streams before the process may exit: a thread
            # still holding them when the interpreter ends aborts the process.
            self._thread.join()
            self._thread = None
        if isinstance(result, StartupError):
            raise result
        if isinstance(result, BaseException):
            raise StartupError(f"loading the model failed: {type(result).__name__}: {result}")
        self._worker = result
        self.started_at = time.time()
        return result.loaded

    def _make_worker(self, loaded: LoadedModel) -> Worker:
        if self.group is None:
            return Worker(loaded, self.options, self._inbox, self._request_done)
        if self.group.info.leads:
            role: type[LeaderWorker | FollowerWorker] = LeaderWorker
            on_request_done = self._request_done
        else:
            role, on_request_done = FollowerWorker, _no_request_counting
        return role(
            loaded,
            self.options,
            self._inbox,
            on_request_done,
            group=self.group,
            on_failure=self._group_failed,
        )

    def _group_failed(self, reason: str) -> None:
        """A rank is gone, stuck or out of step: fail what this rank holds, then end the process.

        Called on the worker thread, or on the watchdog's while the worker is blocked.
        """
        with self._lock:
            if self._failure is not None:
                return
            self._failure = f"the distributed group failed: {reason}"
        logger.error("%s; ending this process", self._failure)
        if isinstance(self._worker, GroupWorker):
            self._worker.fail_in_flight(self._failure)
        leads = self.group is not None and self.group.info.leads
        end_process(after_s=FAILURE_FLUSH_S if leads else 0.0)

    def wait(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the worker to end (a follower ends when rank 0 says so)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
        return thread is None or not thread.is_alive()

    @property
    def group_info(self) -> GroupInfo | None:
        return self.group.info if self.group is not None else None

    @property
    def failure(self) -> str | None:
        return self._failure

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._thread is None:
            return
        self._inbox.put(STOP)
        self._thread.join(timeout_s)
        self._thread = None

    def drain(self) -> None:
        """Refuse new requests; let running ones finish within the shutdown grace period."""
        if not self._draining:
            self._draining = True
            grace_s = self.options.shutdown_grace_s
            self._inbox.put(Drain(time.monotonic() + grace_s))
            if isinstance(self._worker, GroupWorker):
                # Blocked in a collective whose peer is gone, the worker never reads the Drain:
                # its requests still end with an error event, before their streams are closed.
                worker = self._worker
                backstop = threading.Timer(
                    grace_s + DRAIN_BACKSTOP_S,
                    lambda: worker.fail_in_flight("the server is shutting down"),
                )
                backstop.daemon = True
                backstop.start()

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive() and self._failure is None

    @property
    def loaded(self) -> LoadedModel:
        if self._worker is None:
            raise ServiceUnavailableError("the model is not loaded")
        return self._worker.loaded

    def vision_prompt(self, prompt_text: str, images: list[Any], image_digest: str) -> VisionPrompt:
        """A rendered prompt and its images through the model's processor (image tokens placed).
        Blocking: call it from a worker thread."""
        vision = self.loaded.vision
        if vision is None:
            raise InvalidRequestError(
                "This model does not read images.", param="messages", code="model_not_multimodal"
            )
        try:
            return prepare_vision_prompt(vision, prompt_text, images, image_digest)
        except (ValueError, TypeError) as exc:
            raise InvalidRequestError(
                f"The model's processor could not take these images: {exc}", param="messages"
            ) from None

    def submit(
        self, prompt_tokens: list[int], params: SamplingParams, post: Callable[[Event], None]
    ) -> Cancellation:
        """Queue a request for the worker; full → OverloadedError (429) without queueing it."""
        (cancellation,) = self.submit_all([(prompt_tokens, params, post)])
        return cancellation

    def submit_all(
        self, sequences: list[SequenceRequest], vision: VisionPrompt | None = None
    ) -> list[Cancellation]:
        """Queue sequences that belong together (n choices, several prompts): all or none.

        `vision`: the images of the (one) prompt, processed; their tokens are the prompt's.
        """
        if self._draining:
            raise ServiceUnavailableError(
                "the server is shutting down", retry_after_s=RETRY_AFTER_S
            )
        if not self.alive:
            raise ServiceUnavailableError("the generation engine is not running")
        with self._lock:
            if self._in_flight + len(sequences) > self.capacity:
                raise OverloadedError(
                    f"the server is busy ({self._in_flight} requests in flight); retry shortly",
                    retry_after_s=RETRY_AFTER_S,
                )
            self._in_flight += len(sequences)
        deadline = time.monotonic() + self.options.request_timeout_s
        cancellations = []
        for prompt_tokens, params, post in sequences:
            cancellation = Cancellation()
            submission = Submission(
                tuple(prompt_tokens), params, deadline, cancellation, post, vision
            )
            self._inbox.put(submission)
            cancellations.append(cancellation)
        return cancellations

    def _request_done(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def memory_stats(self) -> dict[str, int] | None:
        """The admission budget: what the model takes and what running requests reserve."""
        if self._worker is None:
            return None
        ledger = self._worker.memory
        return {
            "budget_bytes": ledger.model.budget_bytes,
            "weights_bytes": ledger.model.weights_bytes,
            "reserved_bytes": ledger.reserved_bytes,
            "kv_bytes_per_token": ledger.model.kv_bytes_per_token,
            "activation_bytes_per_token": ledger.model.activation_bytes_per_token,
            "prefill_workspace_bytes": ledger.model.prefill_workspace_bytes,
        }

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        return self._worker.prefix_cache.stats() if self._worker else None

    def stats(self) -> EngineStats:
        counters = self._worker.counters if self._worker else None
        active = counters.active if counters else 0
        with self._lock:
            in_flight = self._in_flight
        return EngineStats(
            requests_total=counters.requests_total if counters else 0,
            requests_active=active,
            requests_queued=max(0, in_flight - active),
            prompt_tokens_total=counters.prompt_tokens_total if counters else 0,
            completion_tokens_total=counters.completion_tokens_total if counters else 0,
            failures_total=counters.failures_total if counters else 0,
            tokens_per_s=counters.tokens_per_s if counters else 0.0,
        )


def _no_request_counting() -> None:
    """A follower's requests are rank 0's: it counts them."""


class TimingObserver(Protocol):
    def first_token(self, seconds: float) -> None: ...
    def next_token(self, seconds: float) -> None: ...


class Generation:
    """One request's events, read by the handler that made it; cancel() when the client is gone.

    A request may generate several sequences (`n` choices, several prompts): each is a row of the
    batch, and its events arrive tagged with its choice index. Made inside the request's coroutine:
    its asyncio.Queue belongs to that loop, and the worker reaches it only through
    call_soon_threadsafe.
    """

    def __init__(
        self,
        engine: Engine,
        choices: list[tuple[list[int], SamplingParams]],
        timing: TimingObserver | None = None,
        vision: VisionPrompt | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self._running = len(choices)
        self._timing = timing
        self._submitted_at = self._last_text_at = time.monotonic()
        self._seen_text = False
        self._admitted: dict[int, int] = {}  # choice index -> prompt tokens found in the cache
        self._early: deque[tuple[int, Event]] = deque()  # read while waiting for admission
        self.ttft_s: float | None = None
        self.completion_tokens = 0
        self._cancellations = engine.submit_all(
            [
                (prompt, params, self._poster(index))
                for index, (prompt, params) in enumerate(choices)
            ],
            vision,
        )

    @property
    def backlog(self) -> int:
        """Events that arrived and are not read yet."""
        return self._events.qsize() + len(self._early)

    def _poster(self, index: int) -> Callable[[Event], None]:
        def post(event: Event) -> None:
            try:
                self._loop.call_soon_threadsafe(self._events.put_nowait, (index, event))
            except RuntimeError:  # the loop has closed: nobody is listening any more
                self.cancel()

        return post

    def cancel(self) -> None:
        for cancellation in self._cancellations:
            cancellation.cancel()

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
        while len(self._admitted) < len(self._cancellations):
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
                self.completion_tokens += event.usage.completion_tokens
            if isinstance(event, Finished | Failed):
                self._running -= 1
            else:
                self._observe_text()
                event = self._with_waiting_text(index, event)
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
