"""Our engine in a thread of the benchmark's process, without HTTP and without a client: the
worker and its host as `mlx-server`'s engine process runs them, each request's events handed to
its own callback (on the worker thread, once per step)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path

from mlx_engine_server.engine.host import EngineHost
from mlx_engine_server.engine.messages import (
    EngineOptions,
    Event,
    FromEngine,
    ModelInfo,
    SamplingParams,
    StepEvents,
    Submit,
)
from mlx_engine_server.models.loader import ModelSource, load_model

DEADLINE_S = 3600.0


class InProcessEngine:
    def __init__(self, model_dir: Path, options: EngineOptions) -> None:
        source = ModelSource(model_path=str(model_dir))
        self._posts: dict[int, Callable[[Event], None]] = {}
        self._ids = itertools.count(1)
        self.host = EngineHost(lambda: load_model(source), options, self._receive)

    def start(self) -> ModelInfo:
        return self.host.start()

    def submit(
        self, prompt: list[int], params: SamplingParams, post: Callable[[Event], None]
    ) -> None:
        request_id = next(self._ids)
        self._posts[request_id] = post
        deadline = time.monotonic() + DEADLINE_S
        self.host.handle(Submit(request_id, ((tuple(prompt), params),), deadline))

    def submit_all(
        self, sequences: list[tuple[list[int], SamplingParams, Callable[[Event], None]]]
    ) -> None:
        for prompt, params, post in sequences:
            self.submit(prompt, params, post)

    def stop(self) -> None:
        self.host.stop(timeout_s=30)

    def _receive(self, message: FromEngine) -> None:
        if isinstance(message, StepEvents):
            for request_id, _, event in message.events:
                self._posts[request_id](event)
