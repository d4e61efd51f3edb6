"""The engine in its own process, as `mlx-server` runs it: faults on either side of the boundary.

A killed engine ends every open stream with an error event, turns /health to 503 and makes the
server exit with status 4; a killed front leaves no engine behind; SIGTERM stops both, exit 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest

from ..model_factory import build_tiny_llama
from .test_shutdown import free_port, start_server, stream_lines

EXIT_ENGINE_FAILED = 4
LONG_STREAM = {"prompt": "Go", "max_tokens": 16000, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def roomy_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm_dir: Path) -> Path:
    dest = tmp_path_factory.mktemp("roomy") / "roomy-llama"
    return build_tiny_llama(dest, smollm_dir, context_window=16384)


@pytest.fixture
def server(roomy_model_dir: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    port = free_port()
    process = start_server(roomy_model_dir, port)
    yield process, f"http://127.0.0.1:{port}"
    if process.poll() is None:
        process.kill()
    process.communicate(timeout=30)  # reaps it and closes its stderr pipe


def engine_pid(base_url: str) -> int:
    status = httpx.get(f"{base_url}/v1/mlx/status", timeout=10).json()
    return int(status["engine"]["process_id"])


def is_running(pid: int) -> bool:
    """Alive and not a zombie (a child that exited but was not reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for(condition: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return True
        time.sleep(0.05)
    return False


def test_the_engine_is_a_child_process_of_the_server(
    server: tuple[subprocess.Popen[str], str],
) -> None:
    process, base_url = server
    pid = engine_pid(base_url)
    assert pid != process.pid
    parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert parent == process.pid


def test_a_killed_engine_ends_streams_with_an_error_and_the_server_exits(
    server: tuple[subprocess.Popen[str], str],
) -> None:
    process, base_url = server
    lines: list[str] = []
    started = threading.Event()
    url = f"{base_url}/v1/completions"
    reader = threading.Thread(target=stream_lines, args=(url, LONG_STREAM, lines, started))
    reader.start()
    assert started.wait(30)
    os.kill(engine_pid(base_url), signal.SIGKILL)
    health: list[int] = []

    def unhealthy() -> bool:
        try:
            health.append(httpx.get(f"{base_url}/health", timeout=2).status_code)
        except httpx.TransportError:
            return False
        return health[-1] == 503

    assert wait_for(unhealthy, 10), health
    reader.join(timeout=30)
    exit_code = process.wait(timeout=30)
    stderr = process.communicate()[1]
    assert exit_code == EXIT_ENGINE_FAILED, stderr
    assert lines[-1] == "[DONE]"
    error = json.loads(lines[-2])["error"]
    assert "engine process ended" in error["message"]
    assert "killed by signal 9" in error["message"]


def test_a_killed_front_leaves_no_engine(server: tuple[subprocess.Popen[str], str]) -> None:
    process, base_url = server
    pid = engine_pid(base_url)
    assert is_running(pid)
    process.kill()
    process.wait(timeout=10)
    assert wait_for(lambda: not is_running(pid), 10), "the engine outlived its front"


def test_sigterm_stops_the_engine_too(server: tuple[subprocess.Popen[str], str]) -> None:
    process, base_url = server
    pid = engine_pid(base_url)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    assert wait_for(lambda: not is_running(pid), 10)
