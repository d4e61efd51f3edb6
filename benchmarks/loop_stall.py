"""Does one big request freeze every other client? /health latency while it is served.

    python benchmarks/loop_stall.py [MODEL_PATH] [--port 8123]

Starts `mlx-server` (the bundled SmolLM2-135M without MODEL_PATH), then for each big request
below sends it from a thread while this thread asks /health every 20 ms, and prints how long the
big request took, its status, and the slowest /health answer meanwhile, next to /health's idle
latency measured in the same run. Tokenizing and template rendering on the event loop show as a
slowest /health close to the big request's own duration.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx

HEALTH_EVERY_S = 0.02
LINE = "The quick brown fox jumps over the lazy dog, again and again. " * 64  # ~4 KB


def big_requests() -> dict[str, tuple[str, dict[str, Any]]]:
    messages = [
        {"role": "user" if index % 2 == 0 else "assistant", "content": LINE}
        for index in range(2048)
    ]
    under_cap = messages[:60]  # 240 KB: tokenized in full, then refused as over the window
    return {
        "/tokenize 240 KB prompt": ("/tokenize", {"prompt": LINE * 60}),
        "chat 60 messages (240 KB)": ("/v1/chat/completions", {"messages": under_cap}),
        "/tokenize 10 MB prompt": ("/tokenize", {"prompt": "word " * 2_000_000}),
        "/tokenize 2,048 messages (8 MB)": ("/tokenize", {"messages": messages}),
        "chat 2,048 messages (8 MB)": (
            "/v1/chat/completions",
            {"messages": messages, "max_tokens": 1},
        ),
        "count_tokens 2,048 messages (8 MB)": (
            "/v1/messages/count_tokens",
            {"model": "m", "messages": messages},
        ),
    }


def start_server(model: str | None, port: int) -> subprocess.Popen[bytes]:
    server = str(Path(sys.executable).parent / "mlx-server")
    args = [server, *([model] if model else []), "--port", str(port), "--quiet"]
    process = subprocess.Popen(args)  # noqa: S603 - our own command line
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("mlx-server did not become healthy")


def health_latencies(base: str, until: threading.Event) -> list[float]:
    latencies = []
    with httpx.Client(timeout=60) as client:
        while not until.is_set():
            started = time.perf_counter()
            client.get(f"{base}/health")
            latencies.append(time.perf_counter() - started)
            time.sleep(HEALTH_EVERY_S)
    return latencies


def measure(base: str, path: str, body: dict[str, Any]) -> tuple[float, int, float]:
    payload = json.dumps(body).encode()
    done = threading.Event()
    outcome: dict[str, Any] = {}

    def send() -> None:
        started = time.perf_counter()
        response = httpx.post(
            f"{base}{path}",
            content=payload,
            headers={"Content-Type": "application/json"},
            timeout=300,
        )
        outcome["duration_s"] = time.perf_counter() - started
        outcome["status"] = response.status_code
        done.set()

    thread = threading.Thread(target=send)
    thread.start()
    latencies = health_latencies(base, done)
    thread.join()
    return outcome["duration_s"], outcome["status"], max(latencies, default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--port", type=int, default=8123)
    args = parser.parse_args()
    base = f"http://127.0.0.1:{args.port}"
    process = start_server(args.model, args.port)
    try:
        idle = health_latencies_for(base, 1.0)
        print(f"/health idle: slowest {idle * 1000:.1f} ms")
        for name, (path, body) in big_requests().items():
            duration_s, status, slowest = measure(base, path, body)
            print(
                f"{name}: {status} in {duration_s:.2f} s; "
                f"slowest /health meanwhile {slowest * 1000:.0f} ms"
            )
    finally:
        process.terminate()
        process.wait(timeout=30)


def health_latencies_for(base: str, seconds: float) -> float:
    stop = threading.Event()
    threading.Timer(seconds, stop.set).start()
    return max(health_latencies(base, stop), default=0.0)


if __name__ == "__main__":
    main()
