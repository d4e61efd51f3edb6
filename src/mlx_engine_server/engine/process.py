"""The engine in a process of its own, seen from the front: spawn it, frame messages over a
socket pair, read its frames on one thread, notice when it dies.

One frame per engine step comes back (engine/process_main.py flushes the worker's outbox after
each step), so the front's event loop wakes once per step, not once per token. The front's
interpreter then spends its time on HTTP, SSE, JSON and templates, while the engine's runs MLX:
two processes, two interpreter locks (the vLLM AsyncLLM / EngineCore split).
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection

from .client import EngineClient
from .front import load_front_model
from .messages import EngineFailed, EngineSpec, FromEngine, ToEngine, decode, encode

logger = logging.getLogger(__name__)

ENGINE_MODULE = "mlx_engine_server.cli.engine_process"
EXIT_WAIT_S = 2.0  # after its socket closes, how long an engine may take to exit


class ProcessTransport:
    def __init__(self, spec: EngineSpec, log_level: str = "info", log_format: str = "text") -> None:
        self._spec = spec
        self._arguments = ["--log-level", log_level, "--log-format", log_format]
        self._process: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._send_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self, deliver: Callable[[FromEngine], None]) -> None:
        front_end, engine_end = socket.socketpair()
        with engine_end:
            descriptor = engine_end.fileno()
            command = [sys.executable, "-m", ENGINE_MODULE, "--fd", str(descriptor)]
            self._process = subprocess.Popen(  # noqa: S603 - our own module, no shell
                [*command, *self._arguments],
                pass_fds=(descriptor,),
                stdin=subprocess.DEVNULL,
                stdout=sys.__stderr__.fileno() if sys.__stderr__ else None,  # stdout: ready line
            )
        self._conn = Connection(front_end.detach())
        self._conn.send_bytes(encode(self._spec))
        self._reader = threading.Thread(
            target=self._read, args=(deliver,), name="engine-reader", daemon=True
        )
        self._reader.start()

    def _read(self, deliver: Callable[[FromEngine], None]) -> None:
        conn = self._conn
        while conn is not None:
            try:
                frame = conn.recv_bytes()
            except (EOFError, OSError):
                break
            deliver(decode(frame))
        code = self._exit_code()
        if not self._stopping:
            deliver(EngineFailed(f"the engine process ended ({_describe(code)})", code))

    def _exit_code(self) -> int | None:
        process = self._process
        if process is None:
            return None
        try:
            return process.wait(EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            process.kill()  # its socket is closed: it can no longer serve anyone
            return process.wait()

    def send(self, message: ToEngine) -> None:
        """Raises OSError once the engine is gone."""
        if self._conn is None:
            raise OSError("the engine process has not started")
        frame = encode(message)
        with self._send_lock:
            self._conn.send_bytes(frame)

    def stop(self, timeout_s: float) -> None:
        """After Stop was sent: wait for the engine to end its requests and exit; then kill it."""
        self._stopping = True
        process = self._process
        if process is not None:
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "the engine process did not stop within %.0f s; killing it", timeout_s
                )
                process.kill()
                process.wait()
        if self._reader is not None:
            self._reader.join(EXIT_WAIT_S)
        if self._conn is not None:
            self._conn.close()

    def wait(self, timeout_s: float) -> bool:
        process = self._process
        if process is None:
            return True
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True


def _describe(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        return f"killed by signal {-code}"
    return f"exit status {code}"


def process_client(spec: EngineSpec, log_level: str, log_format: str) -> EngineClient:
    """A client of an engine in a process of its own (not started yet)."""
    transport = ProcessTransport(spec, log_level, log_format)
    trust = spec.trust_remote_code
    return EngineClient(transport, spec.options, lambda info: load_front_model(info, trust))
