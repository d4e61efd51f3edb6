"""The engine's side of the seam: it loads the model on the MLX thread, turns messages into the
worker's inbox items, and gathers the worker's events into one StepEvents per step.

The same host runs behind both transports: in a thread of the server's process (tests, the
distributed mode) and in the engine process of its own (engine/process.py). `send` is how its
messages leave: a direct call in a thread, an encoded frame on the pipe in a process.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx

from ..errors import StartupError
from ..models.loader import LoadedModel, compute_dtype
from .device import apply_backend_defaults, device_name, memory_bytes, mlx_version
from .distributed.group import Group, end_process
from .distributed.workers import FollowerWorker, GroupWorker, LeaderWorker
from .messages import (
    Cancel,
    Cancellation,
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
    Report,
    SamplingParams,
    StepEvents,
    Stop,
    Submit,
    ToEngine,
)
from .sequences import Submission
from .worker import STOP, Worker
from .worker_thread import run_worker_thread

logger = logging.getLogger(__name__)

# One long prompt (a full prefill chunk and more), then a group of short ones decoding together.
WARMUP_SHAPES = ((600, 1), (40, 8))
WARMUP_TOKENS = 4
WARMUP_FIRST_ID = 100
WARMUP_TIMEOUT_S = 600.0
FAILURE_FLUSH_S = 1.0  # rank 0 of a failed group: time for the error events to reach clients
DRAIN_BACKSTOP_S = 1.0  # within http/sse.SHUTDOWN_MARGIN_S, so the error event goes out first

Outgoing = tuple[int, int, Event]


class EngineHost:
    def __init__(
        self,
        load: Callable[[], LoadedModel],
        options: EngineOptions,
        send: Callable[[FromEngine], None],
        group: Group | None = None,
    ) -> None:
        self._load = load
        self.options = options
        self.group = group
        self._send = send
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._outbox: list[Outgoing] = []
        self._outbox_lock = threading.Lock()
        self._flags: dict[int, list[Cancellation]] = {}  # request id -> its choices' flags
        self._worker: Worker | None = None
        self._thread: threading.Thread | None = None
        self._failure: str | None = None
        self._failure_lock = threading.Lock()
        self.loaded: LoadedModel | None = None
        self._event_frames = 0
        self._event_send_s = 0.0

    def start(self) -> ModelInfo:
        """Load the model on the worker thread and wait for it; raise StartupError on failure."""
        outcome: list[Worker | BaseException] = []
        loaded = threading.Event()

        def ready(result: Worker | BaseException) -> None:
            outcome.append(result)
            loaded.set()

        apply_backend_defaults()
        began = time.monotonic()
        self._thread = run_worker_thread(self._load, self._make_worker, ready)
        loaded.wait()
        result = outcome[0]
        if isinstance(result, BaseException):
            # Let the thread release its MLX streams before the process may exit: a thread
            # still holding them when the interpreter ends aborts the process.
            self._thread.join()
            self._thread = None
        if isinstance(result, StartupError):
            raise result
        if isinstance(result, BaseException):
            raise StartupError(f"loading the model failed: {type(result).__name__}: {result}")
        self._worker = result
        self.loaded = result.loaded
        load_s = time.monotonic() - began
        logger.info("model loaded in %.1f s", load_s)
        warmup_s = self._warm_up(result) if _wants_warmup(self.options, self.group) else 0.0
        return self._model_info(result.loaded, warmup_s)

    def _warm_up(self, worker: Worker) -> float:
        """Requests of the shapes that compile kernels at first use, before any user's: on CUDA,
        NVRTC compiled each 4-bit prefill matmul tile for ~20 s (an 8B model's first request
        took 44 s, the second 1 s; benchmarks/first_request.py)."""
        began = time.monotonic()
        logger.info(
            "warming up: %d requests compile kernels before any user's",
            sum(rows for _, rows in WARMUP_SHAPES),
        )
        finished = threading.Semaphore(0)

        def post(event: Event) -> None:
            if isinstance(event, Finished | Failed):
                finished.release()

        params = SamplingParams(max_tokens=WARMUP_TOKENS, temperature=0.0, ignore_eos=True)
        deadline = time.monotonic() + WARMUP_TIMEOUT_S
        vocabulary = len(worker.loaded.tokenizer._tokenizer)
        for length, rows in WARMUP_SHAPES:
            for row in range(rows):
                prompt = tuple((WARMUP_FIRST_ID + row + i) % vocabulary for i in range(length))
                self._inbox.put(Submission(prompt, params, deadline, Cancellation(), post))
            for _ in range(rows):
                finished.acquire(timeout=WARMUP_TIMEOUT_S)
        worker.forget_warmup()
        warmup_s = time.monotonic() - began
        logger.info("warmed up in %.1f s", warmup_s)
        return warmup_s

    def _model_info(self, loaded: LoadedModel, warmup_s: float) -> ModelInfo:
        return ModelInfo(
            model_id=loaded.model_id,
            model_path=loaded.model_path,
            resolved_path=str(loaded.resolved_path),
            adapter_path=loaded.adapter_path,
            kind=loaded.kind,
            context_window=loaded.context_window,
            quantization=loaded.quantization,
            created=loaded.created,
            device=device_name(),
            dtype=compute_dtype(loaded.model),
            mlx_version=mlx_version(),
            engine_pid=os.getpid(),
            group=self.group.info if self.group is not None else None,
            warmup_s=round(warmup_s, 3),
        )

    def _make_worker(self, loaded: LoadedModel) -> Worker:
        if self.group is None:
            return Worker(loaded, self.options, self._inbox, flush=self._flush)
        if self.group.info.leads:
            role: type[LeaderWorker | FollowerWorker] = LeaderWorker
        else:
            role = FollowerWorker
        return role(
            loaded,
            self.options,
            self._inbox,
            group=self.group,
            on_failure=self._group_failed,
            flush=self._flush,
        )

    def handle(self, message: ToEngine) -> None:
        """One message from the front; called on the thread that receives them."""
        if isinstance(message, Submit):
            self._submit(message)
        elif isinstance(message, Cancel):
            for flag in self._flags.get(message.request_id, ()):
                flag.cancel()
        elif isinstance(message, Drain):
            self._inbox.put(message)
            self._arm_drain_backstop(message.deadline)
        elif isinstance(message, Stop):
            self._inbox.put(STOP)
        elif isinstance(message, ReadReport):
            self._send(Report(message.query_id, self.report()))

    def _submit(self, message: Submit) -> None:
        flags = [Cancellation() for _ in message.choices]
        self._flags[message.request_id] = flags
        remaining = [len(message.choices)]
        for index, ((prompt, params), flag) in enumerate(zip(message.choices, flags, strict=True)):
            post = self._poster(message.request_id, index, remaining)
            self._inbox.put(
                Submission(prompt, params, message.deadline, flag, post, message.vision)
            )

    def _poster(self, request_id: int, index: int, remaining: list[int]) -> Callable[[Event], None]:
        def post(event: Event) -> None:
            with self._outbox_lock:
                self._outbox.append((request_id, index, event))
                if isinstance(event, Finished | Failed):
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        self._flags.pop(request_id, None)

        return post

    def _flush(self) -> None:
        """After each step of the worker: everything it posted, as one message."""
        with self._outbox_lock:
            events, self._outbox = self._outbox, []
        if events:
            started = time.perf_counter()
            self._send(StepEvents(tuple(events)))
            self._event_send_s += time.perf_counter() - started
            self._event_frames += 1

    def report(self) -> EngineReport:
        worker = self._worker
        counters = worker.counters if worker is not None else None
        stats = EngineStats(
            requests_total=counters.requests_total if counters else 0,
            requests_active=counters.active if counters else 0,
            requests_queued=0,  # the front knows: it counts what it submitted
            prompt_tokens_total=counters.prompt_tokens_total if counters else 0,
            completion_tokens_total=counters.completion_tokens_total if counters else 0,
            failures_total=counters.failures_total if counters else 0,
            cancelled_total=counters.cancelled_total if counters else 0,
            tokens_per_s=counters.tokens_per_s() if counters else 0.0,
            draft_tokens_total=counters.draft_tokens_total if counters else 0,
            accepted_tokens_total=counters.accepted_tokens_total if counters else 0,
        )
        return EngineReport(
            stats=stats,
            memory_budget=_memory_budget(worker),
            device_memory=memory_bytes(),
            prefix_cache=worker.prefix_cache.stats() if worker is not None else None,
            event_frames=self._event_frames,
            event_send_s=self._event_send_s,
        )

    def _arm_drain_backstop(self, deadline: float) -> None:
        if not isinstance(self._worker, GroupWorker):
            return
        # Blocked in a collective whose peer is gone, the worker never reads the Drain:
        # its requests still end with an error event, before their streams are closed.
        worker = self._worker

        def fail_in_flight() -> None:
            worker.fail_in_flight("the server is shutting down")
            self._flush()

        wait_s = max(0.0, deadline - time.monotonic()) + DRAIN_BACKSTOP_S
        backstop = threading.Timer(wait_s, fail_in_flight)
        backstop.daemon = True
        backstop.start()

    def _group_failed(self, reason: str) -> None:
        """A rank is gone, stuck or out of step: fail what this rank holds, then end the process.

        Called on the worker thread, or on the watchdog's while the worker is blocked.
        """
        with self._failure_lock:
            if self._failure is not None:
                return
            self._failure = f"the distributed group failed: {reason}"
        logger.error("%s; ending this process", self._failure)
        if isinstance(self._worker, GroupWorker):
            self._worker.fail_in_flight(self._failure)
            self._flush()
        self._send(EngineFailed(self._failure))
        leads = self.group is not None and self.group.info.leads
        end_process(after_s=FAILURE_FLUSH_S if leads else 0.0)

    @property
    def alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive() and self._failure is None

    def wait(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the worker to end (a follower ends when rank 0 says so)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
        return thread is None or not thread.is_alive()

    def stop(self, timeout_s: float) -> None:
        if self._thread is None:
            return
        self._inbox.put(STOP)
        self._thread.join(timeout_s)
        self._thread = None


def _wants_warmup(options: EngineOptions, group: Group | None) -> bool:
    if group is not None:  # the ranks step rank 0's plans only: no side requests
        return False
    if options.warmup is not None:
        return options.warmup
    return mx.default_device().type == mx.DeviceType.gpu and mx.cuda.is_available()


def _memory_budget(worker: Worker | None) -> dict[str, int] | None:
    """The admission budget: what the model takes and what running requests reserve."""
    if worker is None:
        return None
    ledger = worker.memory
    return {
        "budget_bytes": ledger.model.budget_bytes,
        "weights_bytes": ledger.model.weights_bytes,
        "reserved_bytes": ledger.reserved_bytes,
        "kv_bytes_per_token": ledger.model.kv_bytes_per_token,
        "activation_bytes_per_token": ledger.model.activation_bytes_per_token,
        "prefill_workspace_bytes": ledger.model.prefill_workspace_bytes,
        "draft_weights_bytes": ledger.model.draft_weights_bytes,
        "draft_kv_bytes_per_token": ledger.model.draft_kv_bytes_per_token,
    }
