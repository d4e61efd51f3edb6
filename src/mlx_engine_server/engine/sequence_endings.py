"""How a request leaves the worker: finished, cancelled, past its deadline, drained at shutdown,
or failed before it joined the batch. Each gives back its memory, counts itself and posts its
last event. A base class of `Worker`."""

from __future__ import annotations

import time
from collections import deque

from mlx_lm.generate import BatchGenerator

from .counters import Counters
from .memory import MemoryLedger
from .messages import Event, Failed, Finished, FinishReason, Usage
from .sequences import LiveSequence, Submission
from .vision_prefill import VisionPrefill


class SequenceEndings:
    memory: MemoryLedger
    counters: Counters
    _live: dict[int, LiveSequence]
    _waiting: deque[Submission]
    _prefilling: deque[VisionPrefill]
    _drain_deadline: float | None
    _generator: BatchGenerator

    def _end_unstarted(self, submission: Submission, need_bytes: int, event: Failed | str) -> None:
        """A request that ended before joining the batch gives back its memory."""
        self.memory.release(need_bytes)
        self._end(submission, Failed(event) if isinstance(event, str) else event)

    def _finish(self, uid: int, reason: FinishReason, stop_sequence: str | None = None) -> None:
        sequence = self._retire(uid)
        submission = sequence.submission
        usage = Usage(
            prompt_tokens=len(submission.prompt_tokens),
            completion_tokens=sequence.completion_tokens,
            cached_tokens=sequence.cached_tokens,
        )
        self.counters.completion_tokens_total += sequence.completion_tokens
        self._end(submission, Finished(reason, usage, stop_sequence))

    def _retire(self, uid: int) -> LiveSequence:
        sequence = self._live.pop(uid)
        self.memory.release(sequence.reserved_bytes)
        return sequence

    def _end(self, submission: Submission, event: Event) -> None:
        if isinstance(event, Failed) and event.kind == "cancelled":
            self.counters.cancelled_total += 1
        elif isinstance(event, Failed):
            self.counters.failures_total += 1
        submission.post(event)
        self.counters.active = len(self._live)

    def _drop_abandoned(self) -> None:
        """Requests whose client left or whose deadline passed leave the batch before the step."""
        now = time.monotonic()
        for uid, sequence in list(self._live.items()):
            reason = self._abandon_reason(sequence.submission, now)
            if reason is not None:
                self._remove(uid, reason)
        for submission in list(self._waiting):
            reason = self._abandon_reason(submission, now)
            if reason is not None:
                self._waiting.remove(submission)
                self._end(submission, reason)
        for prefill in list(self._prefilling):
            reason = self._abandon_reason(prefill.submission, now)
            if reason is not None:
                self._prefilling.remove(prefill)
                self._end_unstarted(prefill.submission, prefill.reserved_bytes, reason)

    def _abandon_reason(self, submission: Submission, now: float) -> Failed | None:
        if submission.cancellation.cancelled:
            return Failed("cancelled", kind="cancelled")
        if now > submission.deadline:
            return Failed("the request passed its deadline", kind="timeout")
        if self._drain_deadline is not None and now > self._drain_deadline:
            return Failed("the server is shutting down", kind="shutdown")
        return None

    def _remove(self, uid: int, event: Failed) -> None:
        self._generator.remove([uid])
        sequence = self._retire(uid)
        self.counters.completion_tokens_total += sequence.completion_tokens
        self._end(sequence.submission, event)

    def _cancel_all(self) -> None:
        for uid in list(self._live):
            self._remove(uid, Failed("the server is shutting down", kind="shutdown"))
        while self._waiting:
            self._end(
                self._waiting.popleft(), Failed("the server is shutting down", kind="shutdown")
            )
        self._end_prefills(Failed("the server is shutting down", kind="shutdown"))

    def _end_prefills(self, event: Failed) -> None:
        while self._prefilling:
            prefill = self._prefilling.popleft()
            self._end_unstarted(prefill.submission, prefill.reserved_bytes, event)
