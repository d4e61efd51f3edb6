"""The engine's whole vocabulary: plain data that crosses from the HTTP front to the engine and
back, whether the engine runs in a thread or in a process of its own, and its one codec.

No mx.array, pydantic model or Starlette object appears here: only ints, strs, floats, bytes,
tuples and (for a prompt's images) numpy arrays. In: Submit, Cancel, Drain, Stop, ReadReport.
Out: Ready once, one StepEvents per engine step, Report per ReadReport, EngineFailed.
"""

from __future__ import annotations

import io
import pickle
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

FinishReason = Literal["stop", "length"]
DistributedMode = Literal["tensor", "pipeline"]
SpeculativeMode = Literal["none", "ngram", "draft"]


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
    speculative: SpeculativeMode = "none"
    num_draft_tokens: int = 5  # the most tokens a row drafts in one step
    ngram_size: int = 3  # the longest run of tokens matched against the context to find a draft
    ngram_min_size: int = 2  # the shortest, tried when no longer one matches
    draft_model_path: str | None = None  # --speculative draft: the smaller model that drafts
    kv_bits: int | None = None  # running rows' and cached prefixes' KV stored quantized
    kv_group_size: int = 64
    # Run a few requests through the batch before Ready, so that kernels compiled at first use
    # are compiled then, not in a user's request; None: on CUDA only (NVRTC compiles there).
    warmup: bool | None = None


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
    kind: Literal["internal", "timeout", "shutdown", "memory", "cancelled"] = "internal"


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
    cancelled_total: int = 0  # ended because the client hung up: no failure of ours
    draft_tokens_total: int = 0  # speculative decoding: tokens drafted and verified
    accepted_tokens_total: int = 0  # drafted tokens the model agreed with

    @property
    def acceptance_rate(self) -> float:
        total = self.draft_tokens_total
        return self.accepted_tokens_total / total if total else 0.0


@dataclass(frozen=True)
class GroupInfo:
    backend: str
    size: int
    rank: int
    mode: DistributedMode

    @property
    def leads(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class ModelInfo:
    """What the front needs to know of the loaded model; `resolved_path` holds its tokenizer."""

    model_id: str
    model_path: str
    resolved_path: str
    adapter_path: str | None
    kind: Literal["text", "vision"]
    context_window: int
    quantization: str | None
    created: int
    device: str
    dtype: str | None
    mlx_version: str
    engine_pid: int
    group: GroupInfo | None = None
    warmup_s: float = 0.0


@dataclass(frozen=True)
class VisionPrompt:
    """A prompt with its images, processed: plain token ids and numpy arrays."""

    token_ids: tuple[int, ...]
    arrays: dict[str, np.ndarray[Any, Any]]
    image_digest: str  # all images of the prompt, in order


@dataclass(frozen=True)
class PrefixCacheStats:
    entries: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int
    cached_tokens_total: int


@dataclass(frozen=True)
class EngineReport:
    """The engine's figures at one moment, for /v1/mlx/status and /metrics."""

    stats: EngineStats
    memory_budget: dict[str, int] | None
    device_memory: dict[str, int]
    prefix_cache: PrefixCacheStats | None
    event_frames: int = 0  # StepEvents sent: one per step that had events
    event_send_s: float = 0.0  # time the worker spent handing them over (encode and write)


Choice = tuple[tuple[int, ...], SamplingParams]  # (prompt tokens, how to sample)


@dataclass(frozen=True)
class Submit:
    """All sequences of one request (n choices, several prompts): admitted all or none."""

    request_id: int
    choices: tuple[Choice, ...]
    deadline: float  # time.monotonic() seconds: one clock for every process of a machine
    vision: VisionPrompt | None = None


@dataclass(frozen=True)
class Cancel:
    request_id: int


@dataclass(frozen=True)
class Drain:
    """Shutting down: requests still running at `deadline` (monotonic seconds) end with an error."""

    deadline: float


@dataclass(frozen=True)
class Stop:
    """End every request and the engine."""


@dataclass(frozen=True)
class ReadReport:
    query_id: int


@dataclass(frozen=True)
class Ready:
    model: ModelInfo


@dataclass(frozen=True)
class StepEvents:
    """Every event of one engine step: (request id, choice index, event)."""

    events: tuple[tuple[int, int, Event], ...]


@dataclass(frozen=True)
class Report:
    query_id: int
    report: EngineReport


@dataclass(frozen=True)
class EngineFailed:
    """The engine could not start, or has stopped working; nothing more will come from it."""

    reason: str
    exit_code: int | None = None


@dataclass(frozen=True)
class EngineSpec:
    """The first frame to an engine process: which model to load, and how to run it."""

    model_path: str | None
    adapter_path: str | None
    model_id: str | None
    cache_dir: str
    trust_remote_code: bool
    options: EngineOptions
    gguf_requantize: str = "auto"
    dtype: str = "auto"


ToEngine = Submit | Cancel | Drain | Stop | ReadReport
FromEngine = Ready | StepEvents | Report | EngineFailed

_NUMPY_CLASSES = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "scalar"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "Path"),
}
_OURS = __name__.rsplit(".", 2)[0] + "."


class _Unpickler(pickle.Unpickler):
    """Only our own dataclasses, numpy arrays and paths: a frame names nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(_OURS) or (module, name) in _NUMPY_CLASSES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not an engine message")


def encode(message: object) -> bytes:
    """One message as one frame. Both ends are this package, so pickle's speed is safe to use
    once find_class is limited to our own types."""
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def decode(frame: bytes) -> Any:
    return _Unpickler(io.BytesIO(frame)).load()
