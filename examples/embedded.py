"""Run mlx-server inside a Python program: start it, wait for its ready line, use it, stop it.

.venv/bin/python examples/embedded.py [MODEL_PATH] [--max-tokens N]

The server runs as a child process on a free port (`--port 0`) and prints one JSON line on
stdout once it accepts requests: {"event": "ready", "url": ..., "host": ..., "port": ...,
"model": ...}. Closing its stdin stops it (`--exit-on-stdin-close`); `--parent-pid` stops it if
this program dies without closing it. A fresh API key keeps other local programs out.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
from typing import Any

from openai import OpenAI

READY_TIMEOUT_S = 300


def start_server(model_path: str | None, api_key: str) -> tuple[subprocess.Popen[str], Any]:
    command = [sys.executable, "-m", "mlx_engine_server", "--port", "0"]
    command += ["--exit-on-stdin-close", "--parent-pid", str(os.getpid())]
    if model_path:
        command.append(model_path)
    # The key travels in the environment: unlike arguments, other users cannot read it in `ps`.
    env = {**os.environ, "MLX_SERVER_API_KEYS": api_key}
    server = subprocess.Popen(  # noqa: S603 - our own command line, no shell
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    assert server.stdout is not None
    line = server.stdout.readline()  # blocks until the model is loaded and the port is open
    if not line:
        raise SystemExit(f"mlx-server exited with status {server.wait()} before it was ready")
    return server, json.loads(line)


def stop_server(server: subprocess.Popen[str]) -> int:
    assert server.stdin is not None
    server.stdin.close()  # the server drains running requests and exits
    return server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_path", nargs="?", help="default: the bundled SmolLM2")
    parser.add_argument("--max-tokens", type=int, default=20)
    args = parser.parse_args()

    api_key = secrets.token_urlsafe(24)
    server, ready = start_server(args.model_path, api_key)
    try:
        print(f"ready: {ready['model']} at {ready['url']}", flush=True)
        client = OpenAI(base_url=f"{ready['url']}/v1", api_key=api_key)
        reply = client.chat.completions.create(
            model=ready["model"],
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=args.max_tokens,
            temperature=0,
        )
        print("reply:", reply.choices[0].message.content, flush=True)
    finally:
        code = stop_server(server)
    print("server exited with status", code)


if __name__ == "__main__":
    main()
