"""The MLX thread itself: it loads the model, hands the worker to its starter, runs it (under
cProfile when $MLX_ENGINE_PROFILE names a file) and clears MLX's streams when it ends."""

from __future__ import annotations

import cProfile
import os
import threading
from collections.abc import Callable

import mlx.core as mx

from ..models.loader import LoadedModel
from .worker import Worker

PROFILE_ENV = "MLX_ENGINE_PROFILE"


def _run_profiled(worker: Worker) -> None:
    """$MLX_ENGINE_PROFILE=FILE: the worker thread's cProfile, written when it ends (benchmarks
    use it to see where the engine's time goes; it slows the engine down)."""
    profile = cProfile.Profile()
    try:
        profile.runcall(worker.run)
    finally:
        profile.dump_stats(os.environ[PROFILE_ENV])


def run_worker_thread(
    load: Callable[[], LoadedModel],
    make_worker: Callable[[LoadedModel], Worker],
    ready: Callable[[Worker | BaseException], None],
) -> threading.Thread:
    """Start the MLX thread: it loads the model, reports through `ready`, then serves the inbox."""

    def main() -> None:
        try:
            worker = make_worker(load())
        except BaseException as exc:  # reported to the starting thread
            mx.clear_streams()
            ready(exc)
            return
        ready(worker)
        try:
            _run_profiled(worker) if os.environ.get(PROFILE_ENV) else worker.run()
        finally:
            mx.clear_streams()

    thread = threading.Thread(target=main, name="mlx-worker", daemon=True)
    thread.start()
    return thread
