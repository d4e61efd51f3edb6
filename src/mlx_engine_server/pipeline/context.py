"""What the pipeline is handed for one request, instead of Starlette's request: the engine, the
options it reads, the chat formats, the compaction counters, the timing observer, the ASGI
`receive` through which it hears that the client left, and where it notes what the request's log
line reports. The route builds it (http/context.py); the pipeline imports no Starlette.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..chat.media import MediaPolicy
from ..chat.overflow import CompactionCounters
from ..chat.plan import ChatFormats
from ..engine import EngineClient, Generation, TimingObserver
from ..protocols.openai.limits import RequestLimits
from ..protocols.openai.types import OverflowPolicy
from .admission import Receive


@dataclass(frozen=True)
class GenerationOptions:
    """The part of Settings the pipeline reads (http/context.ServerOptions adds the HTTP part)."""

    strict_model_name: bool = False
    max_tokens_default: int | None = None
    context_overflow: OverflowPolicy = "error"
    allow_request_overflow_policy: bool = False
    summary_keep_messages: int = 6
    summary_max_tokens: int = 512
    tool_call_parser: str = "auto"
    reasoning_parser: str = "auto"
    max_n: int = 8
    max_prompts: int = 16
    limits: RequestLimits = field(default_factory=RequestLimits)
    log_prompts: bool = False
    media: MediaPolicy = field(default_factory=MediaPolicy)


class RequestNotes(Protocol):
    """The request's log line (http/access_log.RequestRecord): what the pipeline tells it."""

    def note_prompt(self, text: str) -> None: ...
    def note_generation(
        self, prompt_tokens: int, cached_tokens: int, generation: Generation
    ) -> None: ...


@dataclass(frozen=True)
class RequestContext:
    """One request's view of the app, as plain values and callables."""

    engine: EngineClient
    options: GenerationOptions
    chat_formats: Callable[[], ChatFormats]  # worked out on first use, then the same
    compactions: CompactionCounters
    timing: TimingObserver | None
    receive: Receive  # the request's: a disconnect ends its generation
    notes: RequestNotes | None = None
