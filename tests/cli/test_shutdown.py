"""SIGTERM on a real process: running requests get the grace period, the rest end with an error."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from ..model_factory import build_tiny_llama

GRACE_S = 1.5


@pytest.fixture(scope="module")
def roomy_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm_dir: Path) -> Path:
    dest = tmp_path_factory.mktemp("roomy") / "roomy-llama"
    return build_tiny_llama(dest, smollm_dir, context_window=16384)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(
    model_dir: Path, port: int, grace_s: float = GRACE_S, log_level: str = "warning"
) -> subprocess.Popen[str]:
    command = [
        str(Path(sys.executable).parent / "mlx-server"),
        str(model_dir),
        "--port",
        str(port),
        "--shutdown-grace-s",
        str(grace_s),
        "--log-level",
        log_level,
        "--log-format",
        "json",
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    stderr = process.communicate()[1]
    raise RuntimeError(f"mlx-server did not become healthy:\n{stderr[-3000:]}")


def stream_lines(
    url: str, body: dict[str, object], lines: list[str], started: threading.Event
) -> None:
    with httpx.stream("POST", url, json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                lines.append(line[len("data: ") :])
                started.set()


def test_sigterm_lets_short_requests_finish_and_ends_long_ones(roomy_model_dir: Path) -> None:
    port = free_port()
    process = start_server(roomy_model_dir, port)
    url = f"http://127.0.0.1:{port}/v1/completions"
    streams = {
        "short": {"prompt": "Hi", "max_tokens": 30, "ignore_eos": True, "stream": True},
        "long": {"prompt": "Go", "max_tokens": 16000, "ignore_eos": True, "stream": True},
    }
    received: dict[str, list[str]] = {name: [] for name in streams}
    started = {name: threading.Event() for name in streams}
    threads = [
        threading.Thread(target=stream_lines, args=(url, body, received[name], started[name]))
        for name, body in streams.items()
    ]
    for thread in threads:
        thread.start()
    assert all(event.wait(30) for event in started.values())
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(timeout=30)
    exit_code = process.wait(timeout=30)
    elapsed = time.monotonic() - signalled
    stderr = process.communicate()[1]

    assert exit_code == 0, stderr
    assert "Traceback" not in stderr
    assert elapsed < GRACE_S + 8
    short_chunks = [json.loads(line) for line in received["short"][:-1]]
    assert received["short"][-1] == "[DONE]"
    assert short_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert received["long"][-1] == "[DONE]"
    error = json.loads(received["long"][-2])["error"]
    assert error["code"] == "service_unavailable"
    assert "shutting down" in error["message"]


def start_stream(url: str, body: dict[str, object]) -> tuple[threading.Thread, list[str]]:
    lines: list[str] = []
    started = threading.Event()
    thread = threading.Thread(target=stream_lines, args=(url, body, lines, started))
    thread.start()
    assert started.wait(30)
    return thread, lines


LONG_STREAM = {"prompt": "Go", "max_tokens": 16000, "ignore_eos": True, "stream": True}


def access_lines(stderr: str) -> list[dict[str, object]]:
    records = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [record for record in records if record.get("logger") == "mlx_engine_server.access"]


def test_during_the_grace_period_new_requests_and_health_get_503(roomy_model_dir: Path) -> None:
    """The listener stays open while draining: refusals are real answers, not closed sockets."""
    grace_s = 4.0
    port = free_port()
    process = start_server(roomy_model_dir, port, grace_s=grace_s, log_level="info")
    base = f"http://127.0.0.1:{port}"
    thread, lines = start_stream(f"{base}/v1/completions", LONG_STREAM)
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    refused = httpx.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    health = httpx.get(f"{base}/health")
    refused_at = time.monotonic() - signalled
    thread.join(timeout=30)
    exit_code = process.wait(timeout=30)
    stderr = process.communicate()[1]

    assert refused_at < grace_s
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "service_unavailable"
    assert health.status_code == 503
    assert health.json()["reason"] == "shutting down"
    assert json.loads(lines[-2])["error"]["code"] == "service_unavailable"
    assert lines[-1] == "[DONE]"
    assert time.monotonic() - signalled >= grace_s
    assert exit_code == 0, stderr
    assert "Traceback" not in stderr
    completions = [r for r in access_lines(stderr) if r["path"] == "/v1/completions"]
    (long_line,) = [r for r in completions if r["status"] == 200]
    assert isinstance(long_line["completion_tokens"], int)
    assert long_line["completion_tokens"] >= len(lines) - 2


def test_idle_server_exits_at_once_on_sigterm(roomy_model_dir: Path) -> None:
    port = free_port()
    process = start_server(roomy_model_dir, port, grace_s=30)
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    exit_code = process.wait(timeout=30)
    elapsed_s = time.monotonic() - signalled
    stderr = process.communicate()[1]
    assert exit_code == 0, stderr
    assert elapsed_s < 5


def test_second_sigint_ends_open_streams_with_an_error_and_exits_130(
    roomy_model_dir: Path,
) -> None:
    port = free_port()
    process = start_server(roomy_model_dir, port, grace_s=60)
    base = f"http://127.0.0.1:{port}"
    thread, lines = start_stream(f"{base}/v1/completions", LONG_STREAM)
    signalled = time.monotonic()
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert httpx.get(f"{base}/health").status_code == 503
    process.send_signal(signal.SIGINT)
    thread.join(timeout=30)
    exit_code = process.wait(timeout=30)
    stderr = process.communicate()[1]

    assert exit_code == 130, stderr
    assert time.monotonic() - signalled < 15
    assert "Traceback" not in stderr
    error = json.loads(lines[-2])["error"]
    assert error["code"] == "service_unavailable"
    assert "interrupted" in error["message"]
    assert lines[-1] == "[DONE]"
