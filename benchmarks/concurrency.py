"""Throughput under concurrent clients: ours against mlx_lm.server, same model, same run.

    .venv/bin/python benchmarks/concurrency.py [MODEL_PATH] [--clients 1,8,32] [--max-tokens 64]

Starts each server as a real process on a free loopback port, sends the same greedy streaming
requests from N client threads at once, and prints generated tokens per second and mean time to
first token for both, side by side. MODEL_PATH defaults to the bundled SmolLM2-135M (a .gguf is
converted once with our converter, since mlx_lm.server cannot read GGUF).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx

from mlx_engine_server.models.gguf import convert_gguf, is_gguf_file
from mlx_engine_server.models.loader import bundled_model_path

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


@dataclass(frozen=True)
class Run:
    tokens: int
    seconds: float
    mean_ttft_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(command: list[str], port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(  # noqa: S603 - our own command lines
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"server did not start: {' '.join(command)}")


def one_request(base_url: str, max_tokens: int, index: int) -> tuple[int, float]:
    """Stream one greedy chat completion; return (completion tokens, seconds to first token)."""
    body = {
        "messages": [{"role": "user", "content": f"{PROMPT} (#{index})"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = None
    tokens = 0
    content_chunks = 0
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=600) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                content_chunks += 1
                first = first if first is not None else time.perf_counter() - started
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    # A server that sends no usage: count its content chunks, about one token each.
    return tokens or content_chunks, first if first is not None else time.perf_counter() - started


def measure(base_url: str, clients: int, max_tokens: int) -> Run:
    one_request(base_url, 4, -1)  # warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        results = list(pool.map(lambda i: one_request(base_url, max_tokens, i), range(clients)))
    seconds = time.perf_counter() - started
    tokens = sum(count for count, _ in results)
    return Run(tokens, seconds, sum(ttft for _, ttft in results) / len(results))


def servers(model_dir: Path, port_ours: int, port_theirs: int) -> dict[str, list[str]]:
    bin_dir = Path(sys.executable).parent
    return {
        "mlx-engine-server": [
            str(bin_dir / "mlx-server"),
            str(model_dir),
            "--port",
            str(port_ours),
            "--log-level",
            "warning",
        ],
        "mlx_lm.server": [
            sys.executable,
            "-m",
            "mlx_lm.server",
            "--model",
            str(model_dir),
            "--port",
            str(port_theirs),
            "--temp",
            "0",
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_path", nargs="?")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    model = Path(args.model_path) if args.model_path else bundled_model_path()
    if is_gguf_file(model):
        model = convert_gguf(model, Path(tempfile.gettempdir()) / "mlx-bench-cache")
    counts = [int(n) for n in args.clients.split(",")]
    ports = {"mlx-engine-server": free_port(), "mlx_lm.server": free_port()}
    results: dict[str, dict[int, Run]] = {}
    for name, command in servers(model, ports["mlx-engine-server"], ports["mlx_lm.server"]).items():
        process = start(command, ports[name])
        try:
            base = f"http://127.0.0.1:{ports[name]}"
            results[name] = {n: measure(base, n, args.max_tokens) for n in counts}
        finally:
            process.terminate()
            process.wait(timeout=30)
    print_table(results, counts)


def print_table(results: dict[str, dict[int, Run]], counts: list[int]) -> None:
    ours, theirs = results["mlx-engine-server"], results["mlx_lm.server"]
    header = f"{'ours tok/s':>10} {'TTFT s':>7} | {'mlx_lm tok/s':>12} {'TTFT s':>7}"
    print(f"{'clients':>7} | {header} | ratio")
    for n in counts:
        a, b = ours[n], theirs[n]
        ratio = a.tokens_per_s / b.tokens_per_s
        print(
            f"{n:>7} | {a.tokens_per_s:>10.1f} {a.mean_ttft_s:>7.2f} | "
            f"{b.tokens_per_s:>12.1f} {b.mean_ttft_s:>7.2f} | {ratio:.2f}x"
        )


if __name__ == "__main__":
    main()
