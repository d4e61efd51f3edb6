"""Clients that hang up, stall or flood, against a real `mlx-server` process over raw sockets:
a hang-up is a client closure (499, counted apart from failures, no traceback); stalled headers
and bodies are timed out; open connections are capped and /health keeps answering."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from mlx_engine_server.http.app import ServerOptions
from mlx_engine_server.http.connections import ConnectionLimits, guarded_h11

from ..cli.test_cli import MLX_SERVER, ServerProcess, clean_env, free_port, wait_until_healthy
from ..conftest import run_live_server, start_engine

MAX_CONNECTIONS = 64
TIMEOUT_S = 2.0
CHAT_PATH = "/v1/chat/completions"
PAGE_ORIGIN = "https://app.example"  # a page allowed by --cors-origin


@pytest.fixture(scope="module")
def server(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """Short header and body timeouts and a small connection cap; JSON log lines."""
    work = tmp_path_factory.mktemp("hostile")
    port = free_port()
    args = [str(tiny_model_dir), "--port", str(port), "--cache-dir", str(work / "cache")]
    args += ["--log-format", "json", "--max-connections", str(MAX_CONNECTIONS)]
    args += ["--header-timeout-s", str(TIMEOUT_S), "--cors-origin", PAGE_ORIGIN]
    env = clean_env(MLX_SERVER_BODY_TIMEOUT_S=str(TIMEOUT_S))  # env and flags both reach it
    log_path = work / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([MLX_SERVER, *args], env=env, stdout=log, stderr=log)
    live = ServerProcess(process, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_until_healthy(live)
        yield live
    finally:
        process.kill()
        process.wait(timeout=10)


def address(server: ServerProcess) -> tuple[str, int]:
    host, port = server.base_url.removeprefix("http://").split(":")
    return host, int(port)


def access_lines(server: ServerProcess) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("logger") == "mlx_engine_server.access"]


def wait_for(condition: Callable[[], Any], timeout_s: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.05)
    pytest.fail("the server did not get there in time")


def logged_with_id(server: ServerProcess, request_id: str) -> dict[str, Any]:
    def line() -> dict[str, Any] | None:
        return next((x for x in access_lines(server) if x["request_id"] == request_id), None)

    found: dict[str, Any] = wait_for(line)
    return found


def counters(server: ServerProcess) -> dict[str, int]:
    found: dict[str, int] = httpx.get(f"{server.base_url}/v1/mlx/status").json()["counters"]
    return found


def raw_post(path: str, body: bytes, request_id: str, length: int | None = None) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"X-Request-ID: {request_id}\r\nContent-Length: {length or len(body)}\r\n\r\n"
    )
    return head.encode() + body


def long_chat(**fields: Any) -> bytes:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 200, "ignore_eos": True}
    return json.dumps({**body, **fields}).encode()


def assert_no_traceback(server: ServerProcess) -> None:
    log = server.log()
    assert "Traceback" not in log
    assert '"status": 500' not in log


# --- client hang-ups ---------------------------------------------------------------------------


def test_body_cut_short_is_a_client_closure(server: ServerProcess) -> None:
    with socket.create_connection(address(server)) as sock:
        sock.sendall(raw_post(CHAT_PATH, b'{"messages": [', "cut-body", length=500))
    line = logged_with_id(server, "cut-body")
    assert line["status"] == 499
    assert line["error_code"] == "client_closed_request"
    assert_no_traceback(server)


def test_client_leaving_a_whole_answer_is_cancelled_not_failed(server: ServerProcess) -> None:
    before = counters(server)
    with socket.create_connection(address(server)) as sock:
        sock.sendall(raw_post(CHAT_PATH, long_chat(), "left-early"))
        time.sleep(0.05)
    assert logged_with_id(server, "left-early")["status"] == 499
    after = wait_for(
        lambda: (c := counters(server))["cancelled_total"] > before["cancelled_total"] and c
    )
    assert after["failures_total"] == before["failures_total"]
    metrics = httpx.get(f"{server.base_url}/metrics").text
    assert f'mlx_server_http_requests_total{{path="{CHAT_PATH}",status="499"}}' in metrics
    assert "mlx_server_request_cancellations_total" in metrics
    assert 'status="500"' not in metrics
    assert_no_traceback(server)


def test_client_leaving_a_stream_is_a_client_closure(server: ServerProcess) -> None:
    with httpx.stream(
        "POST",
        f"{server.base_url}{CHAT_PATH}",
        content=long_chat(stream=True),
        headers={"Content-Type": "application/json", "X-Request-ID": "left-stream"},
    ) as response:
        assert response.status_code == 200
        next(response.iter_lines())
    assert logged_with_id(server, "left-stream")["status"] == 499
    assert_no_traceback(server)


# --- stalled clients and the connection cap ----------------------------------------------------


def open_fds(server: ServerProcess) -> int:
    return len(os.listdir(f"/proc/{server.process.pid}/fd"))


def stalled_sockets(server: ServerProcess, count: int, name: str) -> list[socket.socket]:
    """Thirds: silent, half a header block, a header block and half its body."""
    sockets = []
    for index in range(count):
        sock = socket.create_connection(address(server))
        if index % 3 == 1:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        elif index % 3 == 2:
            sock.sendall(raw_post(CHAT_PATH, b"{", f"{name}-{index}", length=100))
        sockets.append(sock)
    return sockets


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="counts descriptors in /proc")
def test_stalled_connections_are_capped_and_health_answers(server: ServerProcess) -> None:
    baseline = open_fds(server)
    sockets = stalled_sockets(server, 300, "flood")
    try:
        started = time.monotonic()
        health = httpx.get(f"{server.base_url}/health", timeout=5)
        assert health.status_code == 200
        assert time.monotonic() - started < TIMEOUT_S  # before any stalled one timed out
        assert open_fds(server) <= baseline + MAX_CONNECTIONS + 2
    finally:
        for sock in sockets:
            sock.close()


def test_stalled_headers_and_bodies_get_408_and_are_closed(server: ServerProcess) -> None:
    silent, half_headers, half_body = stalled_sockets(server, 3, "stalled")
    with silent, half_headers, half_body:
        for sock in (silent, half_headers, half_body):
            sock.settimeout(TIMEOUT_S * 10)
        assert silent.recv(1024) == b""  # an idle connection is closed without a word
        assert half_headers.recv(1024).startswith(b"HTTP/1.1 408 ")
        answer = half_body.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
    assert logged_with_id(server, "stalled-2")["status"] == 408
    assert_no_traceback(server)


def test_a_stalled_anthropic_body_gets_a_408_in_anthropics_shape(server: ServerProcess) -> None:
    """The refusal is written to the socket past the app: it spoke OpenAI's shape everywhere."""
    with socket.create_connection(address(server)) as sock:
        sock.settimeout(TIMEOUT_S * 10)
        sock.sendall(raw_post("/v1/messages", b"{", "stalled-anthropic", length=100))
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408 ")
    body = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert body["type"] == "error"
    assert body["error"]["type"] == "timeout_error"
    assert "stalled" in body["error"]["message"]


def test_a_page_allowed_by_cors_can_read_its_408(server: ServerProcess) -> None:
    """The refusal is written past the app's CORS middleware: it writes the header itself."""
    answers = []
    for origin in (PAGE_ORIGIN, None):
        with socket.create_connection(address(server)) as sock:
            sock.settimeout(TIMEOUT_S * 10)
            request = raw_post(CHAT_PATH, b"{", "stalled-page", length=100)
            if origin is not None:
                request = request.replace(b"\r\n", f"\r\nOrigin: {origin}\r\n".encode(), 1)
            sock.sendall(request)
            answers.append(sock.recv(4096).partition(b"\r\n\r\n")[0].lower())
    allowed, no_origin = answers
    assert allowed.startswith(b"http/1.1 408 ")
    assert b"\r\naccess-control-allow-origin: https://app.example\r\n" in allowed
    assert no_origin.startswith(b"http/1.1 408 ")
    assert b"access-control-allow-origin" not in no_origin


def test_when_every_connection_is_busy_a_new_one_gets_503(server: ServerProcess) -> None:
    """Connections reading a body are busy, not idle: none is closed to make room."""
    busy = [socket.create_connection(address(server)) for _ in range(MAX_CONNECTIONS)]
    try:
        for index, sock in enumerate(busy):
            sock.sendall(raw_post(CHAT_PATH, b"{", f"busy-{index}", length=100))
        time.sleep(0.5)  # every header block read: each connection is now waiting for its body
        with socket.create_connection(address(server)) as late:
            late.settimeout(TIMEOUT_S * 5)
            answer = late.recv(4096)
        assert answer.startswith(b"HTTP/1.1 503 ")
        error = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
        assert error["code"] == "too_many_connections"
    finally:
        for sock in busy:
            sock.close()
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200


def test_with_every_origin_allowed_refusals_before_a_request_say_so_too(
    tiny_model_dir: Path,
) -> None:
    """A 503 at the door and a 408 for half a header block come before any Origin is read:
    only `--cors-origin '*'` can be answered then."""
    limits = ConnectionLimits(header_timeout_s=0.5, max_connections=1, cors_origins=frozenset("*"))
    live = run_live_server(
        start_engine(tiny_model_dir), ServerOptions(cors_origins=("*",)), http=guarded_h11(limits)
    )
    host, port = live.base_url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port))) as busy:
            busy.sendall(raw_post(CHAT_PATH, b"{", "busy", length=100))
            time.sleep(0.2)
            with socket.create_connection((host, int(port))) as late:
                late.settimeout(10)
                refused = late.recv(4096).lower()
        with socket.create_connection((host, int(port))) as half:
            half.settimeout(10)
            half.sendall(b"GET /health HTTP/1.1\r\nOrigin: https://any.example\r\n")
            timed_out = half.recv(4096).lower()
    finally:
        live.stop()
    assert refused.startswith(b"http/1.1 503 ")
    assert timed_out.startswith(b"http/1.1 408 ")
    for answer in (refused, timed_out):
        assert b"\r\naccess-control-allow-origin: *\r\n" in answer
