"""Recent time-to-first-token and inter-token latency percentiles, for /v1/mlx/status.

/metrics has the histograms since start; an operator (and the status page) also wants how the
server does now. Samples come from the front's own clock, as a client sees them: the Generation's
timing observer (ServerMetrics) adds them on the event loop, so no lock is needed. Each window
keeps at most MAX_SAMPLES of its last LATENCY_WINDOW_S seconds.
"""

from __future__ import annotations

import math
import time
from collections import deque

LATENCY_WINDOW_S = 60.0
MAX_SAMPLES = 4096
PERCENTILES = (50, 90, 99)


class RecentLatencies:
    """Samples of one latency, in seconds, over the last `window_s` seconds."""

    def __init__(self, window_s: float = LATENCY_WINDOW_S, max_samples: int = MAX_SAMPLES) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)

    def add(self, seconds: float, now: float | None = None) -> None:
        self._samples.append((time.monotonic() if now is None else now, seconds))

    def summary(self, now: float | None = None) -> dict[str, float | int | None]:
        """`count` and `p50`, `p90`, `p99` (nearest rank) in seconds; None without samples."""
        cutoff = (time.monotonic() if now is None else now) - self.window_s
        while self._samples and self._samples[0][0] < cutoff:
            self._samples.popleft()
        values = sorted(seconds for _, seconds in self._samples)
        summary: dict[str, float | int | None] = {"count": len(values)}
        for percent in PERCENTILES:
            summary[f"p{percent}"] = round(nearest_rank(values, percent), 6) if values else None
        return summary


def nearest_rank(ordered: list[float], percent: float) -> float:
    """The smallest sample at or above `percent` % of them: p50 of [1, 2, 3, 4] is 2."""
    rank = max(1, math.ceil(percent / 100 * len(ordered)))
    return ordered[rank - 1]
