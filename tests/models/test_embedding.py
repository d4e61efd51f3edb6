"""Embedding in a desktop program: ready line, ready file, Unix socket, parent and stdin exits."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx
import pytest

from ..cli.test_cli import MLX_SERVER, REPO_ROOT, clean_env

READY_TIMEOUT_S = 90.0
EXIT_TIMEOUT_S = 20.0


def wait_for_file(path: Path, process: subprocess.Popen[str]) -> str:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if path.exists():
            return path.read_text(encoding="utf-8")
        if process.poll() is not None:
            pytest.fail(f"mlx-server exited with {process.returncode}: {process.communicate()}")
        time.sleep(0.1)
    pytest.fail(f"no ready file within {READY_TIMEOUT_S} s")


def test_example_starts_a_server_on_port_0_and_talks_to_it(tiny_model_dir: Path) -> None:
    example = str(REPO_ROOT / "examples" / "embedded.py")
    done = subprocess.run(
        [sys.executable, example, str(tiny_model_dir), "--max-tokens", "3"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("ready: tiny-llama at http://127.0.0.1:"), done.stdout
    assert lines[1].startswith("reply:"), done.stdout
    assert lines[-1] == "server exited with status 0", done.stdout


def test_uds_ready_file_and_parent_exit(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Serve on a Unix socket; the stand-in parent dies; the server exits 0 and cleans up."""
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    socket_path = tmp_path / "mlx.sock"
    ready_file = tmp_path / "ready.json"
    args = [str(tiny_model_dir), "--uds", str(socket_path), "--ready-file", str(ready_file)]
    args += ["--parent-pid", str(parent.pid), "--log-format", "json"]
    server = subprocess.Popen(
        [MLX_SERVER, *args],
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = json.loads(wait_for_file(ready_file, server))
        assert ready["event"] == "ready"
        assert (ready["uds"], ready["port"], ready["model"]) == (
            str(socket_path),
            None,
            "tiny-llama",
        )
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path))) as client:
            models = client.get("http://localhost/v1/models", timeout=30)
            assert models.json()["data"][0]["id"] == "tiny-llama"
            assert client.get("http://any-name/health", timeout=30).status_code == 200
        parent.kill()
        parent.wait()
        stdout, stderr = server.communicate(timeout=EXIT_TIMEOUT_S)
    finally:
        parent.kill()
        server.kill()
    assert server.returncode == 0, stderr
    assert [json.loads(line) for line in stdout.splitlines()] == [ready]
    assert not ready_file.exists()
    assert not socket_path.exists()
    logs = [json.loads(line) for line in stderr.splitlines()]  # --log-format json: every line
    assert any("ended: shutting down" in entry["message"] for entry in logs)
    assert any(entry.get("path") == "/v1/models" and entry["status"] == 200 for entry in logs)


def test_stdin_close_stops_the_server_and_port_0_prints_one_ready_line(
    tiny_model_dir: Path,
) -> None:
    with subprocess.Popen(
        [MLX_SERVER, str(tiny_model_dir), "--port", "0", "--exit-on-stdin-close"],
        env=clean_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as server:
        assert server.stdout is not None
        assert server.stdin is not None
        ready = json.loads(server.stdout.readline())
        assert ready["host"] == "127.0.0.1"
        assert ready["port"] > 0
        assert ready["url"] == f"http://127.0.0.1:{ready['port']}"
        assert httpx.get(f"{ready['url']}/health", timeout=30).status_code == 200
        server.stdin.close()
        code = server.wait(timeout=EXIT_TIMEOUT_S)
        rest = server.stdout.read()
    assert code == 0
    assert rest == ""  # one ready line, nothing else on stdout
