"""Running the app: load the model, then serve over TCP or a Unix socket until told to stop.

The address is bound first (in use: exit 5 at once); it accepts connections only once the
model is loaded. For programs that start the server as a child
(desktop applications): one JSON ready line on stdout, and in --ready-file, once requests are
accepted; a graceful exit when the parent process dies (--parent-pid) or stdin closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from ..chat.parsers import known_tool_call_parsers
from ..engine import EngineClient
from ..engine.device import keep_kernels_in
from ..engine.distributed.group import EXIT_GROUP_FAILED, end_process, join_group
from ..engine.local import local_client
from ..engine.messages import EngineFailed
from ..engine.process import process_client
from ..errors import CannotListenError, StartupError
from ..http.app import ServerOptions, create_app
from ..http.connections import fit_open_file_limit, guarded_h11
from ..http.guards import is_loopback_host
from ..http.sse import SHUTDOWN_MARGIN_S
from ..models.loader import ModelSource, Sharding, load_model
from .config import Settings
from .logs import effective_log_level
from .options import connection_limits, engine_options, engine_spec, server_options
from .proxies import trusted_proxies
from .state import state_store

logger = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
PARENT_POLL_S = 0.5
UNIX_SOCKET_MODE = 0o600  # only the user who started the server may connect
FOLLOWER_MARGIN_S = 5.0
EXIT_ENGINE_FAILED = 4  # the engine process died while serving
EXIT_INTERRUPTED = 130  # a second SIGINT/SIGTERM during the grace period (128 + SIGINT)
ENGINE_FAILURE_EXIT_S = 1.0


def serve(settings: Settings) -> int:
    """Load the model, then serve until SIGINT/SIGTERM (or the parent or stdin goes away).

    The address is bound first: one in use is an error at once (CannotListenError), not after
    a model load of minutes. It accepts connections only once the model is loaded.
    """
    source = ModelSource(
        model_path=settings.model_path,
        adapter_path=settings.adapter_path,
        model_id=settings.model_id,
        cache_dir=settings.cache_dir,
        trust_remote_code=settings.trust_remote_code,
        gguf_requantize=settings.gguf_requantize,
        dtype=settings.dtype,
    )
    if settings.tool_call_parser not in known_tool_call_parsers():
        raise StartupError(
            f"unknown --tool-call-parser {settings.tool_call_parser!r}; "
            f"choose one of {', '.join(known_tool_call_parsers())}"
        )
    keep_kernels_in(settings.cache_dir)
    group = join_group(settings.distributed_mode, settings.distributed_timeout_s)
    if group is None:
        with bound_sockets(settings) as sockets:
            engine = process_client(
                engine_spec(settings), effective_log_level(settings), settings.log_format
            )
            return serve_http(settings, engine, sockets, EXIT_ENGINE_FAILED)
    # rank 0's signals and exit are tied to the HTTP process: the engine stays in it
    sharding = Sharding(group.handle, group.info.mode)
    engine = local_client(lambda: load_model(source, sharding), engine_options(settings), group)
    if not group.info.leads:
        engine.start()
        return follow_rank_zero(engine, settings.shutdown_grace_s)
    with bound_sockets(settings) as sockets:
        return serve_http(settings, engine, sockets, EXIT_GROUP_FAILED)


def serve_http(
    settings: Settings, engine: EngineClient, sockets: list[socket.socket], failed_exit: int
) -> int:
    """Start the engine, then serve on `sockets` until told to stop; `failed_exit` is the
    status when the engine fails."""
    store = state_store(settings)  # a state dir that cannot be used fails before the model loads
    loaded = engine.start()
    logger.info(
        "serving %s (%s, context window %d tokens) from %s",
        loaded.model_id,
        loaded.kind,
        loaded.context_window,
        loaded.model_path,
    )
    options = server_options(settings)
    warn_if_exposed(settings, options)
    app = create_app(engine, options, store)
    server = GracefulServer(uvicorn_config(app, settings), engine)
    engine.on_failure = server.engine_failed
    server.on_started = lambda listeners: announce(settings, loaded.model_id, listeners)
    watch_for_exit(settings, server)
    try:
        server.run(sockets=sockets)
    finally:
        engine.stop()
        if settings.ready_file is not None:
            settings.ready_file.unlink(missing_ok=True)
    if engine.failure is not None:
        return failed_exit
    if server.interrupted:
        return EXIT_INTERRUPTED
    return 0 if server.started else 1


def follow_rank_zero(engine: EngineClient, shutdown_grace_s: float) -> int:
    """Ranks 1..N-1 of a group serve no HTTP: they step rank 0's batches until it ends the group.

    A signal does not end a follower at once (launchers signal every rank, and rank 0 first
    drains its requests, which needs every rank); one that rank 0 does not follow with the end
    of the group within the grace period ends this process, and so the group.
    """
    signalled: list[float] = []
    previous = {
        sig: signal.signal(sig, lambda *_: signalled.append(time.monotonic()))
        for sig in HANDLED_SIGNALS
    }
    try:
        while not engine.wait(timeout_s=0.5):
            if signalled and time.monotonic() - signalled[0] > shutdown_grace_s + FOLLOWER_MARGIN_S:
                logger.error("rank 0 did not end the group after a signal; leaving it")
                end_process(after_s=0.0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def warn_if_exposed(settings: Settings, options: ServerOptions) -> None:
    if settings.uds is None and not is_loopback_host(settings.host) and not options.api_keys:
        logger.warning(
            "listening on %s without an API key: anyone who can reach this address can use the "
            "model; set --api-key (or bind 127.0.0.1)",
            settings.host,
        )


def uvicorn_config(app: Any, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        root_path=settings.root_path,
        forwarded_allow_ips=trusted_proxies(settings.forwarded_allow_ips, os.environ),
        log_level=effective_log_level(settings),
        log_config=None,  # our handler on the root logger (logs.py) formats uvicorn's lines too
        access_log=False,  # request_log.py writes one line per request instead
        http=guarded_h11(fit_open_file_limit(connection_limits(settings))),  # uvicorn's h11
        h11_max_incomplete_event_size=2 * settings.max_header_bytes,
        server_header=False,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s + SHUTDOWN_MARGIN_S * 2),
    )


@contextlib.contextmanager
def bound_sockets(settings: Settings) -> Iterator[list[socket.socket]]:
    """The sockets to serve on, bound (not yet listening): a TCP address's, or a Unix socket
    only its owner may use (uvicorn's own would be world-writable). CannotListenError if the
    address is taken or not ours to bind."""
    sockets = _bind_unix(settings.uds) if settings.uds is not None else _bind_tcp(settings)
    try:
        yield sockets
    finally:
        for sock in sockets:
            sock.close()
        if settings.uds is not None:
            settings.uds.unlink(missing_ok=True)


def _bind_tcp(settings: Settings) -> list[socket.socket]:
    """Every address the host name stands for, as asyncio's create_server would bind them."""
    where = f"{settings.host}:{settings.port}"
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(
            settings.host, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise CannotListenError(f"cannot listen on {where}: {_reason(exc)}") from None
    return sockets


def _bind_unix(path: Path) -> list[socket.socket]:
    if path.is_socket():
        path.unlink()  # left over from a previous run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise CannotListenError(f"cannot listen on {path}: {_reason(exc)}") from None
    finally:
        os.umask(previous_umask)
    os.chmod(path, UNIX_SOCKET_MODE)
    return [sock]


def _reason(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "the address is already in use (another server?); pick another --port"
    return exc.strerror or str(exc)


def ready_line(settings: Settings, model_id: str, listeners: Sequence[socket.socket]) -> str:
    """One JSON object: where the server listens and what it serves."""
    if settings.uds is not None:
        where: dict[str, Any] = {"host": None, "port": None, "uds": str(settings.uds)}
        where["url"] = "http://localhost"
    else:
        host, port = listeners[0].getsockname()[:2]
        shown = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)  # noqa: S104
        url_host = f"[{shown}]" if ":" in shown else shown
        where = {"host": host, "port": port, "uds": None, "url": f"http://{url_host}:{port}"}
    return json.dumps({"event": "ready", "model": model_id, **where, "pid": os.getpid()})


def announce(settings: Settings, model_id: str, listeners: Sequence[socket.socket]) -> None:
    line = ready_line(settings, model_id, listeners)
    logger.info("ready: %s", line)
    if settings.ready_file is not None:
        write_atomically(settings.ready_file, line + "\n")
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def write_atomically(path: Path, text: str) -> None:
    """Readers see no file or the whole file, never half of one."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def watch_for_exit(settings: Settings, server: GracefulServer) -> None:
    def stop(reason: str) -> None:
        logger.warning("%s: shutting down", reason)
        server.handle_exit(signal.SIGTERM, None)

    if settings.parent_pid is not None:
        pid = settings.parent_pid
        _daemon(lambda: _wait_for_death(pid, os.getppid()), lambda: stop(f"process {pid} ended"))
    if settings.exit_on_stdin_close:
        _daemon(_wait_for_stdin_close, lambda: stop("stdin closed"))


def _daemon(wait: Callable[[], None], then: Callable[[], None]) -> None:
    def run() -> None:
        wait()
        then()

    threading.Thread(target=run, name="exit-watch", daemon=True).start()


def _wait_for_death(pid: int, parent_at_start: int) -> None:
    while _is_alive(pid) and not (pid == parent_at_start and os.getppid() != pid):
        time.sleep(PARENT_POLL_S)


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _wait_for_stdin_close() -> None:
    if sys.stdin is None:
        return
    descriptor = sys.stdin.fileno()
    while os.read(descriptor, 65536):
        pass


class GracefulServer(uvicorn.Server):
    """uvicorn that drains on SIGINT/SIGTERM, still answering, and then exits 0.

    uvicorn's own shutdown closes the listeners first. Here the first signal only drains: the
    listeners stay open, so a new generation request gets 503 and /health 503 (a load balancer
    sees why), while running requests get the shutdown grace period; the engine ends the rest
    with an error. uvicorn's shutdown starts once nothing is in flight or the grace period is
    over. A second signal ends every open request at once with an error event and the process
    with EXIT_INTERRUPTED; a third one is uvicorn's forced exit. Signals are handled on the
    event loop, never inside the signal handler (which may run while a lock is held).
    """

    def __init__(self, config: uvicorn.Config, engine: EngineClient) -> None:
        super().__init__(config)
        self.engine = engine
        self.on_started: Callable[[Sequence[socket.socket]], None] | None = None
        self.interrupted = False  # a second signal came during the grace period
        self._loop: asyncio.AbstractEventLoop | None = None
        self._signals = 0
        self._drain_ends_at: float | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            listeners = [sock for server in self.servers for sock in server.sockets]
            self.on_started(listeners)

    def engine_failed(self, failure: EngineFailed) -> None:
        """The engine process died: its streams end with an error, /health answers 503 for a
        moment (a load balancer sees why), then the server exits with EXIT_ENGINE_FAILED."""
        logger.error("the engine failed (%s); the server exits", failure.reason)
        timer = threading.Timer(ENGINE_FAILURE_EXIT_S, self._exit_now)
        timer.daemon = True
        timer.start()

    def _exit_now(self) -> None:
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """A signal (or the parent or stdin gone): handled on the event loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self.should_exit = True
            return
        with contextlib.suppress(RuntimeError):  # the loop is closing: nothing left to drain
            loop.call_soon_threadsafe(self._on_signal)

    def _on_signal(self) -> None:
        self._signals += 1
        if self._signals == 1:
            grace_s = self.engine.options.shutdown_grace_s
            logger.warning("shutting down: new requests get 503; running ones get %g s", grace_s)
            self._drain_ends_at = time.monotonic() + grace_s + SHUTDOWN_MARGIN_S
            self.engine.drain()
        elif self._signals == 2:  # noqa: PLR2004 - the second signal
            logger.warning("a second signal: ending every open request now")
            self.interrupted = True
            self.engine.end_all("the server was interrupted")
            self.should_exit = True
        else:
            self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        ends_at = self._drain_ends_at
        if ends_at is not None and (self.engine.in_flight == 0 or time.monotonic() > ends_at):
            self.should_exit = True
        return await super().on_tick(counter)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's, without re-raising the signal at the end: the process would end "killed
        by SIGTERM" even though every request was answered and the model was released."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
