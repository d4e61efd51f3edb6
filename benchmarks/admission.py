"""Where a burst's time to first token goes: admission (response headers) against first token.

    python benchmarks/admission.py MODEL_DIR [--clients 64] [--max-tokens 128]

Starts our server as a process, sends N streaming chat requests at once from client processes
of at most 8 threads (the prompts of load.py, about 200 words each, distinct from their first
word), and prints, per phase, the earliest, median and latest time after the first request was
sent: sent, response headers (the server
sends them once the worker has admitted the request into the batch), first content token, end.
A warm-up burst with the same client count runs first, so CUDA's kernel compiles stay out.
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx

sys.path.insert(0, str(Path(__file__).parent))
from load import CLIENT_START_DELAY_S, CLIENTS_PER_PROCESS, client_pool, make_messages

CONTENT = re.compile(r'"content":"[^"]')


@dataclass(frozen=True)
class Timeline:
    sent: float
    headers: float
    first_token: float
    end: float


def one_request(url: str, salt: str, index: int, max_tokens: int) -> Timeline:
    body = {
        "model": "m",
        "messages": make_messages(salt, index, 200),
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    sent = time.perf_counter()
    first_token = 0.0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        headers = time.perf_counter()
        for line in response.iter_lines():
            if not first_token and CONTENT.search(line):
                first_token = time.perf_counter()
    return Timeline(sent, headers, first_token or headers, time.perf_counter())


def burst(url: str, salt: str, clients: int, max_tokens: int) -> list[Timeline]:
    """The clients in processes of at most CLIENTS_PER_PROCESS threads, as in load.py: one
    process reading 64 streams would time its own GIL, not the server."""
    indices = list(range(clients))
    groups = [indices[i : i + CLIENTS_PER_PROCESS] for i in range(0, clients, CLIENTS_PER_PROCESS)]
    pool = client_pool(len(groups))
    start_at = time.perf_counter() + CLIENT_START_DELAY_S
    futures = [
        pool.submit(timeline_group, url, salt, group, max_tokens, start_at) for group in groups
    ]
    return [timeline for future in futures for timeline in future.result()]


def timeline_group(
    url: str, salt: str, indices: list[int], max_tokens: int, start_at: float
) -> list[Timeline]:
    """In a client process: one request per index, from threads, all sent at `start_at`."""

    def one(index: int) -> Timeline:
        time.sleep(max(0.0, start_at - time.perf_counter()))
        return one_request(url, salt, index, max_tokens)

    with ThreadPoolExecutor(max_workers=len(indices)) as threads:
        return list(threads.map(one, indices))


def report(results: list[Timeline], max_tokens: int) -> None:
    start = min(timeline.sent for timeline in results)
    wall = max(timeline.end for timeline in results) - start
    tokens_per_s = len(results) * max_tokens / wall
    print(f"{len(results)} clients x {max_tokens} tokens: {tokens_per_s:.1f} tok/s")
    for phase in ("sent", "headers", "first_token", "end"):
        times = sorted(getattr(timeline, phase) - start for timeline in results)
        print(
            f"  {phase:<12} min {times[0]:.3f}  p50 {statistics.median(times):.3f}  "
            f"max {times[-1]:.3f} s"
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until_healthy(url: str, server: subprocess.Popen[bytes]) -> None:
    while server.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server exited with status {server.returncode}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--server-flags", default="", help="extra flags for mlx-server")
    args = parser.parse_args()
    port = free_port()
    command = [sys.executable, "-m", "mlx_engine_server", str(args.model), "--port", str(port)]
    command += ["--max-batch-size", "64", "--log-level", "warning", *args.server_flags.split()]
    server = subprocess.Popen(command)  # noqa: S603 - our own command line
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, server)
        burst(url, "warm-up", args.clients, 4)
        report(burst(url, "measured", args.clients, args.max_tokens), args.max_tokens)
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
