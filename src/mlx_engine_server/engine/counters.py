"""The worker's running totals, read by the host for /v1/mlx/status and /metrics."""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

RATE_WINDOW_S = 10.0


@dataclass
class Counters:
    """Written by the worker only; read (racily, which is fine for totals) by the host."""

    requests_total: int = 0
    prompt_tokens_total: int = 0
    completion_tokens_total: int = 0
    failures_total: int = 0
    cancelled_total: int = 0
    active: int = 0
    draft_tokens_total: int = 0  # speculative decoding: tokens proposed for verification
    accepted_tokens_total: int = 0  # and those the model agreed with
    recent_steps: deque[tuple[float, int]] = field(default_factory=deque)
    _steps_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_step(self, tokens: int) -> None:
        now = time.monotonic()
        with self._steps_lock:
            self.recent_steps.append((now, tokens))
            self._forget_before(now - RATE_WINDOW_S)

    def record_drafts(self, drafted: int, accepted: int) -> None:
        self.draft_tokens_total += drafted
        self.accepted_tokens_total += accepted

    def tokens_per_s(self, now: float | None = None) -> float:
        """Tokens generated over the last RATE_WINDOW_S seconds, per second, as of `now`: it
        falls to 0 once generation stops, whether or not another step comes."""
        now = time.monotonic() if now is None else now
        with self._steps_lock:
            self._forget_before(now - RATE_WINDOW_S)
            return sum(tokens for _, tokens in self.recent_steps) / RATE_WINDOW_S

    def _forget_before(self, cutoff: float) -> None:
        while self.recent_steps and self.recent_steps[0][0] < cutoff:
            self.recent_steps.popleft()
