"""The HTTP side's only door into the engine: submit, cancel, drain, stop; events back.

The client decides admission before any response byte (a full engine is a 429 at once, a
draining one a 503), counts the sequences it has in flight, and routes each step's events to the
generations they belong to: one hand-over to the event loop per step, not one per token. Which
transport carries the messages (a thread, or an engine process) it does not know.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from ..errors import InvalidRequestError, OverloadedError, ServiceUnavailableError, StartupError
from .generation import Generation, TimingObserver
from .messages import (
    Cancel,
    Choice,
    Drain,
    EngineFailed,
    EngineOptions,
    EngineReport,
    EngineStats,
    Event,
    Failed,
    Finished,
    FromEngine,
    ModelInfo,
    ReadReport,
    Ready,
    Report,
    SamplingParams,
    StepEvents,
    Stop,
    Submit,
    ToEngine,
    VisionPrompt,
)

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1
REPORT_TIMEOUT_S = 2.0


class Transport(Protocol):
    """How messages reach the engine and come back: a thread, or a process of its own."""

    def start(self, deliver: Callable[[FromEngine], None]) -> None:
        """Start the engine; from now on `deliver` gets its messages, on any thread."""

    def send(self, message: ToEngine) -> None: ...

    def stop(self, timeout_s: float) -> None: ...

    def wait(self, timeout_s: float) -> bool: ...


@dataclass(frozen=True)
class FrontModel:
    """What the front loads itself: the tokenizer, and for a vision model its processor."""

    tokenizer: Any
    vision_prompt: Callable[[str, list[Any], str], VisionPrompt] | None = None


class EngineClient:
    def __init__(
        self,
        transport: Transport,
        options: EngineOptions,
        load_front: Callable[[ModelInfo], FrontModel],
    ) -> None:
        self.options = options
        self._transport = transport
        self._load_front = load_front
        self._lock = threading.Lock()
        self._in_flight = 0
        self._generations: dict[int, Generation] = {}
        self._request_ids = itertools.count(1)
        self._reports: dict[int, Callable[[EngineReport], None]] = {}
        self._ready = threading.Event()
        self._model: ModelInfo | None = None
        self._front: FrontModel | None = None
        self._failure: str | None = None
        self._draining = False
        self._stopped = False
        self.last_report: EngineReport | None = None
        self.on_failure: Callable[[EngineFailed], None] | None = None
        self.started_at = time.time()

    @property
    def capacity(self) -> int:
        return self.options.max_batch_size + self.options.max_queue

    def start(self) -> ModelInfo:
        """Start the engine and wait until its model is loaded; StartupError if it fails."""
        self._transport.start(self._receive)
        self._ready.wait()
        if self._model is None:
            self._transport.stop(timeout_s=5.0)
            raise StartupError(self._failure or "the engine did not start")
        self._front = self._load_front(self._model)
        self.started_at = time.time()
        return self._model

    @property
    def model(self) -> ModelInfo:
        if self._model is None:
            raise ServiceUnavailableError("the model is not loaded")
        return self._model

    @property
    def tokenizer(self) -> Any:
        if self._front is None:
            raise ServiceUnavailableError("the model is not loaded")
        return self._front.tokenizer

    @property
    def failure(self) -> str | None:
        return self._failure

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def in_flight(self) -> int:
        """Sequences submitted whose last event has not come back yet."""
        return self._in_flight

    @property
    def alive(self) -> bool:
        return self._model is not None and self._failure is None and not self._stopped

    def drain(self) -> None:
        """Refuse new requests; let running ones finish within the shutdown grace period."""
        if not self._draining:
            self._draining = True
            self._send(Drain(time.monotonic() + self.options.shutdown_grace_s))

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._send(Stop())
        self._transport.stop(timeout_s)

    def wait(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the engine to end (a follower ends when rank 0 says so)."""
        return self._transport.wait(timeout_s)

    def vision_prompt(self, prompt_text: str, images: list[Any], image_digest: str) -> VisionPrompt:
        """A rendered prompt and its images through the model's processor (image tokens placed).
        Blocking: call it from a worker thread."""
        prepare = self._front.vision_prompt if self._front is not None else None
        if prepare is None:
            raise InvalidRequestError(
                "This model does not read images.", param="messages", code="model_not_multimodal"
            )
        try:
            return prepare(prompt_text, images, image_digest)
        except (ValueError, TypeError) as exc:
            raise InvalidRequestError(
                f"The model's processor could not take these images: {exc}", param="messages"
            ) from None

    def generate(
        self,
        choices: list[tuple[list[int], SamplingParams]],
        timing: TimingObserver | None = None,
        vision: VisionPrompt | None = None,
    ) -> Generation:
        """Submit the sequences of one request, all or none; full → OverloadedError (429).

        `vision`: the images of the (one) prompt, processed; their tokens are the prompt's.
        Call it inside the request's coroutine: the generation's queue belongs to that loop.
        """
        self._admit(len(choices))
        request_id = next(self._request_ids)
        generation = Generation(self, request_id, len(choices), timing)
        self._generations[request_id] = generation
        deadline = time.monotonic() + self.options.request_timeout_s
        frozen: tuple[Choice, ...] = tuple((tuple(prompt), params) for prompt, params in choices)
        if not self._send(Submit(request_id, frozen, deadline, vision)):
            self._engine_failed(EngineFailed("the engine cannot be reached"))
        return generation

    def _admit(self, sequences: int) -> None:
        if self._draining:
            raise ServiceUnavailableError(
                "the server is shutting down", retry_after_s=RETRY_AFTER_S
            )
        if not self.alive:
            raise ServiceUnavailableError(self._failure or "the generation engine is not running")
        with self._lock:
            if self._in_flight + sequences > self.capacity:
                raise OverloadedError(
                    f"the server is busy ({self._in_flight} requests in flight); retry shortly",
                    retry_after_s=RETRY_AFTER_S,
                )
            self._in_flight += sequences

    def cancel(self, request_id: int) -> None:
        if request_id in self._generations and self._failure is None:
            self._send(Cancel(request_id))

    async def report(self) -> EngineReport | None:
        """The engine's current figures (the last ones known if it does not answer in time)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[EngineReport] = loop.create_future()

        def answer(report: EngineReport) -> None:
            loop.call_soon_threadsafe(_resolve, future, report)

        query_id = self._ask_report(answer)
        if query_id is None:
            return self.last_report
        try:
            return self._keep(await asyncio.wait_for(future, REPORT_TIMEOUT_S))
        except (TimeoutError, asyncio.TimeoutError):
            return self.last_report
        finally:
            self._reports.pop(query_id, None)

    def report_now(self) -> EngineReport | None:
        """report(), blocking: for threads other than an event loop's (tests, benchmarks)."""
        answered = threading.Event()
        box: list[EngineReport] = []

        def answer(report: EngineReport) -> None:
            box.append(report)
            answered.set()

        query_id = self._ask_report(answer)
        if query_id is None:
            return self.last_report
        answered.wait(REPORT_TIMEOUT_S)
        self._reports.pop(query_id, None)
        return self._keep(box[0]) if box else self.last_report

    def _ask_report(self, answer: Callable[[EngineReport], None]) -> int | None:
        if not self.alive:
            return None
        query_id = next(self._request_ids)
        self._reports[query_id] = answer
        if not self._send(ReadReport(query_id)):
            self._reports.pop(query_id, None)
            return None
        return query_id

    def _keep(self, report: EngineReport) -> EngineReport:
        with self._lock:
            queued = max(0, self._in_flight - report.stats.requests_active)
        self.last_report = replace(report, stats=replace(report.stats, requests_queued=queued))
        return self.last_report

    def stats(self) -> EngineStats:
        """The figures of the last report (zeros before the first)."""
        report = self.last_report
        if report is not None:
            return report.stats
        return EngineStats(0, 0, 0, 0, 0, 0, 0.0)

    def _send(self, message: ToEngine) -> bool:
        """False once the engine cannot be reached: the reader then reports why it is gone,
        and a Cancel or Stop sent from a response's `finally` must not raise there."""
        try:
            self._transport.send(message)
        except OSError:
            return False
        return True

    def _receive(self, message: FromEngine) -> None:
        """Every message from the engine, on whichever thread the transport delivers it."""
        if isinstance(message, StepEvents):
            self._route(message.events)
        elif isinstance(message, Report):
            self._answer(message)
        elif isinstance(message, Ready):
            self._model = message.model
            self._ready.set()
        elif isinstance(message, EngineFailed):
            self._engine_failed(message)

    def _route(self, events: tuple[tuple[int, int, Event], ...]) -> None:
        """One hand-over per event loop for the whole step."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Generation, int, Event]]]
        by_loop = defaultdict(list)
        for request_id, index, event in events:
            generation = self._generations.get(request_id)
            if generation is None:
                continue
            if isinstance(event, Finished | Failed) and not self._sequence_ended(generation, index):
                continue  # already ended: the engine's last word and ours crossed
            by_loop[generation.loop].append((generation, index, event))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the loop has closed: nobody is listening any more
                for generation, _, _ in batch:
                    generation.cancel()

    def _sequence_ended(self, generation: Generation, index: int) -> bool:
        with self._lock:
            if index in generation.ended:
                return False
            generation.ended.add(index)
            self._in_flight -= 1
            if len(generation.ended) == generation.choices:
                self._generations.pop(generation.request_id, None)
            return True

    def _answer(self, message: Report) -> None:
        answer = self._reports.get(message.query_id)
        if answer is not None:
            answer(message.report)

    def _engine_failed(self, message: EngineFailed) -> None:
        """The engine is gone: every open sequence ends with an error, and nothing new starts."""
        with self._lock:
            if self._failure is not None:
                return
            self._failure = message.reason
        self._ready.set()
        if self._model is None:
            return
        logger.error("the engine failed: %s", message.reason)
        self._end_open(message.reason)
        if self.on_failure is not None and not self._stopped:
            self.on_failure(message)

    def end_all(self, reason: str) -> None:
        """End every open sequence now with an error event, and tell the engine to drop them
        (a second signal during the grace period: nothing more is waited for)."""
        for request_id in self._end_open(reason):
            self._send(Cancel(request_id))

    def _end_open(self, reason: str) -> list[int]:
        """Route a shutdown failure to every sequence not ended yet; their request ids."""
        with self._lock:
            open_requests = list(self._generations.items())
            ended = [
                (request_id, index, Failed(reason, kind="shutdown"))
                for request_id, generation in open_requests
                for index in range(generation.choices)
                if index not in generation.ended
            ]
        self._route(tuple(ended))
        return [request_id for request_id, _ in open_requests]


def _deliver(batch: list[tuple[Generation, int, Event]]) -> None:
    for generation, index, event in batch:
        generation.put(index, event)


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)
