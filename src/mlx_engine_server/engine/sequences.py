"""A request as the worker receives it, and the worker's state for it while it is in the batch."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .constraints import GrammarProcessor
from .messages import Cancellation as CancellationFlag
from .messages import Event, SamplingParams, TokenLogprob, VisionPrompt
from .prefix_cache import TEXT_PARTITION
from .stop_text import StopTextFilter


@dataclass(frozen=True)
class Submission:
    """One request as the worker receives it."""

    prompt_tokens: tuple[int, ...]
    params: SamplingParams
    deadline: float
    cancellation: CancellationFlag
    post: Callable[[Event], None]
    vision: VisionPrompt | None = None  # the prompt's images, processed
    arrived_at: float = field(default_factory=time.monotonic)

    @property
    def cache_partition(self) -> str:
        return self.vision.image_digest if self.vision is not None else TEXT_PARTITION


@dataclass
class LiveSequence:
    """The worker's state for one request in the batch."""

    submission: Submission
    detokenizer: Any
    stop_filter: StopTextFilter
    cached_tokens: int = 0
    reserved_bytes: int = 0
    completion_tokens: int = 0
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    grammar: GrammarProcessor | None = None
