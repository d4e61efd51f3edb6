"""The worker's running totals, read by handlers for /v1/mlx/status and /metrics."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

RATE_WINDOW_S = 10.0


@dataclass
class Counters:
    """Written by the worker only; read (racily, which is fine for counters) by handlers."""

    requests_total: int = 0
    prompt_tokens_total: int = 0
    completion_tokens_total: int = 0
    failures_total: int = 0
    active: int = 0
    tokens_per_s: float = 0.0
    recent_steps: deque[tuple[float, int]] = field(default_factory=deque)
    recent_tokens: int = 0

    def record_step(self, tokens: int) -> None:
        """Generation rate over the last RATE_WINDOW_S seconds, kept as one readable float."""
        now = time.monotonic()
        self.recent_steps.append((now, tokens))
        self.recent_tokens += tokens
        while self.recent_steps[0][0] < now - RATE_WINDOW_S:
            self.recent_tokens -= self.recent_steps.popleft()[1]
        self.tokens_per_s = self.recent_tokens / RATE_WINDOW_S
