"""The engine process itself: load the model, then serve the front's messages until Stop, or
until the front is gone (its socket closes, or its process ends), whichever comes first.

The main thread reads frames and hands them to the host; the MLX thread steps the batch and
sends one frame per step. The engine ignores SIGINT and SIGTERM: a terminal's Ctrl-C reaches
the whole process group, and it is the front that drains and then says Stop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

from ..errors import StartupError
from ..models.draft import load_with_draft
from ..models.loader import ModelSource
from .host import EngineHost
from .messages import EngineFailed, EngineSpec, FromEngine, Ready, Stop, decode, encode

logger = logging.getLogger(__name__)

EXIT_STARTUP_FAILED = 1
ORPHAN_POLL_S = 0.5
STOP_MARGIN_S = 5.0


def serve_engine(conn: Connection) -> int:
    spec = decode(conn.recv_bytes())
    if not isinstance(spec, EngineSpec):
        raise TypeError(f"expected an EngineSpec first, got {type(spec).__name__}")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    _exit_when_orphaned(os.getppid())
    send = _sender(conn)
    source = ModelSource(
        model_path=spec.model_path,
        adapter_path=spec.adapter_path,
        model_id=spec.model_id,
        cache_dir=Path(spec.cache_dir),
        trust_remote_code=spec.trust_remote_code,
        gguf_requantize=spec.gguf_requantize,
        dtype=spec.dtype,
    )
    draft_path = spec.options.draft_model_path
    host = EngineHost(lambda: load_with_draft(source, draft_path), spec.options, send)
    try:
        info = host.start()
    except StartupError as exc:
        send(EngineFailed(str(exc)))
        return EXIT_STARTUP_FAILED
    send(Ready(info))
    return _serve_front(conn, host, spec.options.shutdown_grace_s + STOP_MARGIN_S)


def _serve_front(conn: Connection, host: EngineHost, stop_timeout_s: float) -> int:
    while True:
        try:
            message = decode(conn.recv_bytes())
        except (EOFError, OSError):
            logger.warning("the server's front process is gone; the engine ends")
            os._exit(0)  # nobody is left to answer: do not wait for the batch
        if isinstance(message, Stop):
            host.stop(stop_timeout_s)
            return 0
        host.handle(message)


def _sender(conn: Connection) -> Callable[[FromEngine], None]:
    lock = threading.Lock()

    def send(message: FromEngine) -> None:
        frame = encode(message)
        # The front may be gone: the main thread sees that too, and ends the process.
        with lock, contextlib.suppress(OSError):
            conn.send_bytes(frame)

    return send


def _exit_when_orphaned(parent_pid: int) -> None:
    """Also while the model loads (no frame is read then): a front that died leaves no engine."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(ORPHAN_POLL_S)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
