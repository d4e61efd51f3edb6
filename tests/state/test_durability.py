"""A finished response survives `kill -9` of a real `mlx-server` process: it is in the state
file when the process is gone, and the store reads it back."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path

import httpx2 as httpx

from mlx_engine_server.state.sqlite import STATE_FILE, SqliteStore
from mlx_engine_server.state.store import NO_OWNER, Json, RecordKey

from ..cli.test_cli import MLX_SERVER, ServerProcess, clean_env, free_port, wait_until_healthy

TURN = {"model": "m", "max_output_tokens": 3, "temperature": 0}


def start(model_dir: Path, work: Path) -> ServerProcess:
    port = free_port()
    args = [str(model_dir), "--port", str(port), "--cache-dir", str(work / "cache")]
    args += ["--state-dir", str(work / "state")]
    log_path = work / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([MLX_SERVER, *args], env=clean_env(), stdout=log, stderr=log)
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path)
    wait_until_healthy(server)
    return server


def read_back(path: Path, response_id: str) -> tuple[Json | None, int]:
    async def read() -> tuple[Json | None, int]:
        store = SqliteStore(path)
        key = RecordKey(NO_OWNER, "response", response_id)
        record = await store.get(key)
        items = await store.list_items(key, limit=10)
        await store.close()
        return record, len(items.items)

    return asyncio.run(read())


def test_a_finished_response_survives_kill_9(tiny_model_dir: Path, tmp_path: Path) -> None:
    server = start(tiny_model_dir, tmp_path)
    try:
        created = httpx.post(
            f"{server.base_url}/v1/responses", json={**TURN, "input": "Remember me"}, timeout=60
        )
        assert created.status_code == 200, created.text
    finally:
        server.process.send_signal(signal.SIGKILL)  # at once: no shutdown, no checkpoint
        server.process.wait(timeout=10)
    assert server.process.returncode == -signal.SIGKILL
    record, input_items = read_back(tmp_path / "state" / STATE_FILE, created.json()["id"])
    assert record is not None
    assert record["response"] == created.json()
    assert input_items == 1
