"""A finished response survives `kill -9` of a real `mlx-server` process: the next process on
the same --state-dir serves it and continues it."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import httpx2 as httpx

from ..cli.test_cli import (
    MLX_SERVER,
    ServerProcess,
    assert_clean_failure,
    clean_env,
    free_port,
    run_cli,
    wait_until_healthy,
)

TURN = {"model": "m", "max_output_tokens": 3, "temperature": 0}


def start(model_dir: Path, work: Path, name: str) -> ServerProcess:
    port = free_port()
    args = [str(model_dir), "--port", str(port), "--cache-dir", str(work / "cache")]
    args += ["--state-dir", str(work / "state")]
    log_path = work / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([MLX_SERVER, *args], env=clean_env(), stdout=log, stderr=log)
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path)
    wait_until_healthy(server)
    return server


def test_a_finished_response_survives_kill_9(tiny_model_dir: Path, tmp_path: Path) -> None:
    first = start(tiny_model_dir, tmp_path, "first")
    try:
        created = httpx.post(
            f"{first.base_url}/v1/responses", json={**TURN, "input": "Remember me"}, timeout=60
        )
        assert created.status_code == 200, created.text
    finally:
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=10)
    assert first.process.returncode == -signal.SIGKILL
    assert (tmp_path / "state" / "state.sqlite3").is_file()
    second = start(tiny_model_dir, tmp_path, "second")
    try:
        response_id = created.json()["id"]
        fetched = httpx.get(f"{second.base_url}/v1/responses/{response_id}", timeout=10)
        assert fetched.status_code == 200, fetched.text
        assert fetched.json() == created.json()
        continued = httpx.post(
            f"{second.base_url}/v1/responses",
            json={**TURN, "input": "Again", "previous_response_id": response_id},
            timeout=60,
        )
        assert continued.status_code == 200, continued.text
        assert continued.json()["usage"]["input_tokens"] > created.json()["usage"]["input_tokens"]
    finally:
        second.process.terminate()
        second.process.wait(timeout=20)


def test_an_unusable_state_dir_exits_1_before_loading_the_model(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory", encoding="utf-8")
    outcome = run_cli(str(tiny_model_dir), "--state-dir", str(blocker / "state"))
    assert_clean_failure(outcome, 1, "state store", "--state-dir")
    assert "loading" not in outcome.stderr.lower()
