"""Rate limits per API key: requests and tokens per minute, counted in the state store.

The window is a fixed minute shared by every instance that shares the store. A request is
refused when its key already used the minute's requests or tokens; the tokens a request used
are added once it has been answered (its prompt and completion tokens), so one large request
may overshoot the minute's tokens, as OpenAI's limits may.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from .store import StateStore, WindowCount

WINDOW_S = 60


@dataclass(frozen=True)
class RateLimits:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    @property
    def active(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None


@dataclass(frozen=True)
class RatePolicy:
    """The server's limits, and the limits a key file gives some keys (by owner id)."""

    default: RateLimits = field(default_factory=RateLimits)
    per_owner: Mapping[str, RateLimits] = field(default_factory=dict)

    def limits_for(self, owner: str) -> RateLimits:
        return self.per_owner.get(owner, self.default)

    @property
    def active(self) -> bool:
        return self.default.active or any(limits.active for limits in self.per_owner.values())


@dataclass(frozen=True)
class RateDecision:
    limits: RateLimits
    used: WindowCount  # this request counted

    @property
    def refused_for(self) -> str | None:
        """ "requests" or "tokens" when the request is over a limit."""
        rpm, tpm = self.limits.requests_per_minute, self.limits.tokens_per_minute
        if rpm is not None and self.used.requests > rpm:
            return "requests"
        if tpm is not None and self.used.tokens >= tpm:
            return "tokens"
        return None

    @property
    def retry_after_s(self) -> int:
        return max(1, math.ceil(self.used.reset_s))

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers, for the limits that are set."""
        headers: dict[str, str] = {}
        reset = f"{self.used.reset_s:.3f}s"
        rpm, tpm = self.limits.requests_per_minute, self.limits.tokens_per_minute
        if rpm is not None:
            headers["x-ratelimit-limit-requests"] = str(rpm)
            headers["x-ratelimit-remaining-requests"] = str(max(0, rpm - self.used.requests))
            headers["x-ratelimit-reset-requests"] = reset
        if tpm is not None:
            headers["x-ratelimit-limit-tokens"] = str(tpm)
            headers["x-ratelimit-remaining-tokens"] = str(max(0, tpm - self.used.tokens))
            headers["x-ratelimit-reset-tokens"] = reset
        return headers


async def admit_request(store: StateStore, limits: RateLimits, counter: str) -> RateDecision:
    return RateDecision(limits, await store.count(counter, WINDOW_S, 1, 0))


async def add_tokens(store: StateStore, counter: str, tokens: int) -> None:
    if tokens > 0:
        await store.count(counter, WINDOW_S, 0, tokens)
