"""Plain data that crosses the boundary between HTTP handlers and the MLX worker thread.

No mx.array, pydantic model or Starlette object appears here: only ints, strs, floats and tuples.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # A llguidance grammar in Lark syntax (JSON schemas embedded with `%json { ... }`): the row's
    # tokens are masked to what the grammar allows; end-of-sequence only once it accepts.
    grammar: str | None = None
    # None: no logprobs; k >= 0: each token's logprob and its k most likely alternatives.
    logprobs: int | None = None


@dataclass(frozen=True)
class EngineOptions:
    """The part of Settings the engine needs, built once in serve()."""

    max_batch_size: int = 32
    max_queue: int = 64
    prefill_step_size: int = 512
    request_timeout_s: float = 600.0
    prefix_cache_bytes: int = 1 << 30
    shutdown_grace_s: float = 10.0
    memory_budget_bytes: int | None = None
    fold_quantized_decode: bool = True


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    token_bytes: bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's logprob and the most likely alternatives at that step."""

    token_id: int
    token_bytes: bytes
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class Admitted:
    """The worker has started this request; `cached_tokens` of its prompt came from the cache."""

    cached_tokens: int


@dataclass(frozen=True)
class TextDelta:
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token of `token_ids`, if asked for

    def followed_by(self, later: TextDelta) -> TextDelta:
        return TextDelta(
            self.text + later.text, self.token_ids + later.token_ids, self.logprobs + later.logprobs
        )


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    summary: Usage | None = None  # a context summary made for this request, counted above too

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def with_summary(self, summary: Usage | None) -> Usage:
        if summary is None:
            return self
        return Usage(
            prompt_tokens=self.prompt_tokens + summary.prompt_tokens,
            completion_tokens=self.completion_tokens + summary.completion_tokens,
            cached_tokens=self.cached_tokens + summary.cached_tokens,
            summary=summary,
        )


@dataclass(frozen=True)
class Finished:
    finish_reason: FinishReason
    usage: Usage
    stop_sequence: str | None = None  # the `stop` string that ended the text, if one did


@dataclass(frozen=True)
class Failed:
    """Generation of this request ended by an error; `kind` picks the HTTP error to report."""

    message: str
    kind: Literal["internal", "timeout", "shutdown", "memory"] = "internal"


Event = Admitted | TextDelta | Finished | Failed


@dataclass
class Cancellation:
    """A flag the worker reads every step; set by whoever owns the response's lifetime."""

    _event: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@dataclass(frozen=True)
class EngineStats:
    requests_total: int
    requests_active: int
    requests_queued: int
    prompt_tokens_total: int
    completion_tokens_total: int
    failures_total: int
    tokens_per_s: float
