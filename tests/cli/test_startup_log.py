"""A real `mlx-server` says what it is doing while it starts; `--quiet` keeps stderr to warnings
and errors, and the ready line still comes on stdout."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from .test_cli import MLX_SERVER, clean_env

EXIT_TIMEOUT_S = 20.0
PHASES = ("model: ", "loading the weights from ", "model loaded in ", "serving tiny ")


def start_and_stop(model_dir: Path, log_path: Path, *flags: str) -> tuple[dict[str, Any], str]:
    """The ready line and everything on stderr of a server started with `flags`, then stopped."""
    args = [str(model_dir), "--port", "0", "--exit-on-stdin-close", "--model-id", "tiny", *flags]
    with (
        log_path.open("wb") as log,
        subprocess.Popen(
            [MLX_SERVER, *args],
            env=clean_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        ) as server,
    ):
        assert server.stdout is not None
        assert server.stdin is not None
        line = server.stdout.readline()
        server.stdin.close()
        code = server.wait(timeout=EXIT_TIMEOUT_S)
    stderr = log_path.read_text(encoding="utf-8", errors="replace")
    assert line, stderr
    assert code == 0, stderr
    return json.loads(line), stderr


def test_start_up_logs_each_phase_on_stderr(tiny_model_dir: Path, tmp_path: Path) -> None:
    ready, stderr = start_and_stop(tiny_model_dir, tmp_path / "stderr.log")
    assert ready["event"] == "ready"
    for phase in PHASES:
        assert phase in stderr, (phase, stderr)
    # from the engine process, in the server's format
    assert f" INFO mlx_engine_server.models.loader: model: {tiny_model_dir}\n" in stderr
    assert " on disk)" in stderr


def test_quiet_logs_no_phase_and_still_prints_the_ready_line(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    ready, stderr = start_and_stop(tiny_model_dir, tmp_path / "stderr.log", "--quiet")
    assert ready["event"] == "ready"
    assert ready["model"] == "tiny"
    for phase in PHASES:
        assert phase not in stderr, (phase, stderr)
    assert " INFO " not in stderr
