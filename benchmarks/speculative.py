"""Speculative decoding (prompt lookup, a draft model), against no speculation in the same run.

    .venv/bin/python benchmarks/speculative.py [MODEL_PATH] [--passage-tokens 1000]
        [--max-tokens 128] [--clients 32] [--client-tokens 48] [--draft-model DRAFT_PATH]
        [--ngram-min-size N]

0. The cost of one forward pass over k + 1 positions against one, after a prompt as long as the
   passages: speculation can pay only where it stays well under k + 1 (on this CPU it does not).
1. One stream, the edit set (`edit_prompts.json`: ~1,000-token passages of this repository's own
   docs, built once offline, each returned "with one small change"): decode tokens/s with
   `--speculative ngram` against none, the acceptance rate, and whether the greedy texts match.
   Target: >= 1.5x. With --draft-model, the same for `--speculative draft` (no target: the
   bundled SmolLM2 as its own draft measures the plumbing and the overhead of k more full-size
   forward passes, not a speed-up; a real one needs a draft several times faster).
2. `--clients` concurrent ordinary chat requests (no copying to find): throughput with ngram
   (and the draft model) against none. Target: no more than 5 % lost.
`--kv-bits` (rows in a budget, greedy agreement, speed against a 16-bit cache): `kv_bits.py`.

Each server is a real `mlx-server` process on a free loopback port. MODEL_PATH defaults to the
bundled SmolLM2-135M; on CPU pass smaller --passage-tokens, --max-tokens and --clients to keep
the run short.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import mlx.core as mx
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache

from mlx_engine_server.models.gguf import convert_gguf, is_gguf_file
from mlx_engine_server.models.loader import bundled_model_path

EDITS = Path(__file__).with_name("edit_prompts.json")
STORY = "Write a short story about a lighthouse keeper who finds a message in a bottle."


@dataclass(frozen=True)
class Stream:
    text: str
    tokens: int
    decode_s: float  # first token to last


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def server(model: Path, *flags: str) -> Iterator[str]:
    port = free_port()
    command = [str(Path(sys.executable).parent / "mlx-server"), str(model), "--port", str(port)]
    process = subprocess.Popen(  # noqa: S603 - our own command line
        [*command, "--log-level", "warning", *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base_url, process)
        yield base_url
    finally:
        process.terminate()
        process.wait(timeout=60)


def wait_ready(base_url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not start")


def edit_messages(item: dict[str, Any], passage_tokens: int) -> list[dict[str, str]]:
    words = item["passage"].split(" ")
    passage = " ".join(words[: max(1, len(words) * passage_tokens // item["passage_tokens"])])
    ask = (
        f"Here is a text:\n\n{passage}\n\nReturn the text exactly as it is, with one change: "
        f'replace every "{item["old"]}" with "{item["new"]}". Output only the text.'
    )
    return [{"role": "user", "content": ask}]


def stream(base_url: str, messages: list[dict[str, str]], max_tokens: int) -> Stream:
    body = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    pieces: list[str] = []
    first = last = 0.0
    tokens = 0
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=1800) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                pieces.append(chunk["choices"][0]["delta"]["content"])
                last = time.perf_counter()
                first = first or last
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return Stream("".join(pieces), tokens, max(last - first, 1e-9))


def status(base_url: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{base_url}/v1/mlx/status", timeout=30).json()
    return body


def one_stream(base_url: str, edits: list[dict[str, Any]], args: argparse.Namespace) -> Any:
    stream(base_url, [{"role": "user", "content": "hi"}], 4)  # warm-up
    runs = [
        stream(base_url, edit_messages(item, args.passage_tokens), args.max_tokens)
        for item in edits
    ]
    tokens = sum(run.tokens - 1 for run in runs)  # the first token's time is the prefill's
    return runs, tokens / sum(run.decode_s for run in runs), status(base_url)["speculative"]


def many_clients(base_url: str, clients: int, max_tokens: int) -> tuple[float, list[str]]:
    """Tokens per second over `clients` concurrent greedy requests, and their texts."""
    stream(base_url, [{"role": "user", "content": "hi"}], 4)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        runs = list(
            pool.map(
                lambda i: stream(
                    base_url, [{"role": "user", "content": f"{STORY} (#{i})"}], max_tokens
                ),
                range(clients),
            )
        )
    rate = sum(run.tokens for run in runs) / (time.perf_counter() - started)
    return rate, [run.text for run in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_path", nargs="?")
    parser.add_argument("--passage-tokens", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--edits", type=int, default=4, help="edit prompts used, of the set")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--client-tokens", type=int, default=48)
    parser.add_argument(
        "--ngram-min-size", type=int, help="passed to the ngram server (default: the server's)"
    )
    parser.add_argument(
        "--draft-model",
        help="also measure --speculative draft with this draft model (the model itself: a "
        "measure of the plumbing and its overhead, every greedy draft accepted; no speed-up)",
    )
    args = parser.parse_args()
    model = Path(args.model_path) if args.model_path else bundled_model_path()
    if is_gguf_file(model):
        model = convert_gguf(model, Path(tempfile.gettempdir()) / "mlx-bench-cache")
    edits = json.loads(EDITS.read_text(encoding="utf-8"))[: args.edits]
    report_verification_cost(model, args.passage_tokens)
    report_speculation(measure_speculation(model, edits, args))


def report_verification_cost(model_path: Path, context_tokens: int) -> None:
    """What a pass over k + 1 positions costs against a pass over one, after a prompt of
    `context_tokens`: speculation pays only where the wider pass costs much less than k + 1
    single steps (decoding bound by reading the weights, as on a GPU)."""
    model, _ = load(str(model_path))
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([list(range(100, 100 + context_tokens))]), cache=cache))
    costs: dict[int, float] = {}
    for width in (1, 2, 4, 6):
        times = []
        for _ in range(5):
            started = time.perf_counter()
            mx.eval(model(mx.array([[5] * width]), cache=cache))
            times.append(time.perf_counter() - started)
            for layer in cache:
                layer.trim(width)
        costs[width] = sorted(times)[len(times) // 2]
    cells = "  ".join(f"{w}: {1000 * c:.0f} ms ({c / costs[1]:.1f}x)" for w, c in costs.items())
    print(f"one forward pass over k + 1 positions, against one position: {cells}")
    del model, cache
    mx.clear_cache()  # the servers measured next have the memory to themselves


def measure_speculation(
    model: Path, edits: list[dict[str, Any]], args: argparse.Namespace
) -> dict[str, Any]:
    found: dict[str, Any] = {}
    modes: dict[str, tuple[str, ...]] = {"none": (), "ngram": ()}
    if args.ngram_min_size is not None:
        modes["ngram"] = ("--ngram-min-size", str(args.ngram_min_size))
    if args.draft_model:
        modes["draft"] = ("--draft-model", str(draft_path(args.draft_model)))
    for mode, flags in modes.items():
        with server(model, "--speculative", mode, *flags) as base_url:
            found[mode] = one_stream(base_url, edits, args)
            found[f"{mode}-clients"] = many_clients(base_url, args.clients, args.client_tokens)
    return found


def draft_path(name: str) -> Path:
    path = Path(name)
    if is_gguf_file(path):
        return convert_gguf(path, Path(tempfile.gettempdir()) / "mlx-bench-cache")
    return path


def report_speculation(speculation: dict[str, Any]) -> None:
    for mode in ("ngram", "draft"):
        if mode in speculation:
            report_mode(speculation, mode)


def report_mode(speculation: dict[str, Any], mode: str) -> None:
    plain_runs, plain_rate, _ = speculation["none"]
    spec_runs, spec_rate, counts = speculation[mode]
    same = sum(a.text == b.text for a, b in zip(plain_runs, spec_runs, strict=True))
    target = " (target >= 1.5x)" if mode == "ngram" else ""
    print(f"one stream, edit set ({len(plain_runs)} prompts), greedy decode tokens/s:")
    print(
        f"  none {plain_rate:8.2f}   {mode} {spec_rate:8.2f}   "
        f"speed-up {spec_rate / plain_rate:.2f}x{target}"
    )
    print(
        f"  acceptance rate {counts['acceptance_rate']:.3f} "
        f"({counts['accepted_tokens_total']}/{counts['draft_tokens_total']} drafted tokens)"
    )
    print(f"  texts identical to no speculation: {same}/{len(plain_runs)}")
    (off, _), (on, _) = speculation["none-clients"], speculation[f"{mode}-clients"]
    print(
        f"concurrent clients, tokens/s: none {off:8.2f}   {mode} {on:8.2f}   "
        f"change {100 * (on / off - 1):+.1f} % (target >= -5 %)"
    )


if __name__ == "__main__":
    main()
