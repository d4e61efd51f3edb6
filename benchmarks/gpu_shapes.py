"""Throughput at real model shapes: raw mlx-lm, this server and mlx_lm.server, in one run.

    python benchmarks/gpu_shapes.py --shape smollm2-1.7b --tokenizer DIR --clients 1,8,32,64

Builds a random-weight model of the named shape (bf16 on a GPU, float32 on a CPU; --quantize 4
for 4-bit) with the tokenizer in DIR, then sends the same N chat prompts of --prompt-words words
to (a) raw mlx-lm in-process (stream_generate for one, batch_generate for N), (b) this server and
(c) mlx_lm.server, each generating --max-tokens tokens. Prints output tok/s over the whole wall
time (prefill included), TTFT and inter-token latency p50/p99 and errors, with the ratios.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten
from mlx_lm.generate import batch_generate, stream_generate
from mlx_lm.models import llama
from mlx_lm.utils import load

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
             "num_attention_heads": 4, "num_key_value_heads": 2},
    "smollm2-1.7b": {"hidden_size": 2048, "num_hidden_layers": 24, "intermediate_size": 8192,
                     "num_attention_heads": 32, "num_key_value_heads": 32},
    "llama3-8b": {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0},
}  # fmt: skip
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wise",
    "owls",
    "watch",
]


@dataclass
class Result:
    system: str
    clients: int
    tokens: int
    seconds: float
    errors: int = 0
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def summary(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "clients": self.clients,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "tok_per_s": round(self.tokens_per_s, 1),
            "ttft_p50_s": percentile(self.ttft_s, 50),
            "ttft_p99_s": percentile(self.ttft_s, 99),
            "itl_p50_ms": percentile([x * 1000 for x in self.itl_s], 50),
            "itl_p99_ms": percentile([x * 1000 for x in self.itl_s], 99),
            "errors": self.errors,
        }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def percentile(values: list[float], q: int) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))], 4)


def build_model(shape: str, tokenizer_dir: Path, dest: Path, quantize_bits: int) -> Path:
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    ids = [*spec["model"]["vocab"].values(), *(token["id"] for token in spec["added_tokens"])]
    vocab = max(ids) + 1
    config = {
        "model_type": "llama",
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
        **SHAPES[shape],
    }
    model = llama.Model(llama.ModelArgs.from_dict(config))
    dtype = mx.float32 if mx.default_device().type == mx.DeviceType.cpu else mx.bfloat16
    model.set_dtype(dtype)
    if quantize_bits:
        nn.quantize(model, group_size=64, bits=quantize_bits)
        config["quantization"] = {"group_size": 64, "bits": quantize_bits}
    mx.eval(model.parameters())
    dest.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(dest / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (dest / "config.json").write_text(json.dumps(config))
    for item in tokenizer_dir.iterdir():
        shutil.copy2(item, dest / item.name)
    return dest


def prompts(clients: int, words: int) -> list[list[dict[str, str]]]:
    def text(i: int) -> str:
        return f"Request {i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(words))

    return [[{"role": "user", "content": text(i)}] for i in range(clients)]


def run_raw(model_dir: Path, clients: list[int], words: int, max_tokens: int) -> list[Result]:
    model, tokenizer = load(str(model_dir))[:2]
    results = []
    for n in [1, *clients]:  # the first pass of one client warms up
        token_prompts = [
            tokenizer.apply_chat_template(m, add_generation_prompt=True) for m in prompts(n, words)
        ]
        started = time.perf_counter()
        if n == 1:
            count = sum(1 for _ in stream_generate(model, tokenizer, token_prompts[0], max_tokens))
        else:
            out = batch_generate(
                model, tokenizer, token_prompts, max_tokens=max_tokens, return_token_ids=True
            )
            count = sum(len(ids) for ids in out.token_ids)
        results.append(Result("raw mlx-lm", n, count, time.perf_counter() - started))
    del model
    mx.clear_cache()
    return results[1:]


def stream_one(
    base: str, messages: list[dict[str, str]], max_tokens: int, ours: bool
) -> tuple[int, float, list[float]]:
    body: dict[str, Any] = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    if ours:
        body["ignore_eos"] = True
    started = time.perf_counter()
    arrivals = []
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=600) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if has_text(line):
                arrivals.append(time.perf_counter())
    if not arrivals:
        raise RuntimeError(f"no text came back from {base}")
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return len(arrivals), arrivals[0] - started, gaps


def has_text(line: str) -> bool:
    if not line.startswith("data: {"):
        return False
    choices = json.loads(line[len("data: ") :]).get("choices") or [{}]
    return bool(choices[0].get("delta", {}).get("content"))


def run_server(  # noqa: PLR0917 - one benchmark's knobs
    name: str, command: list[str], port: int, clients: list[int], words: int, max_tokens: int
) -> list[Result]:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process)
        stream_one(base, prompts(1, words)[0], 8, name == "ours")
        return [measure(name, base, n, words, max_tokens) for n in clients]
    finally:
        process.terminate()
        process.wait(timeout=60)


def wait_ready(base: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server at {base} did not start")


def measure(name: str, base: str, n: int, words: int, max_tokens: int) -> Result:
    result = Result(name, n, 0, 0.0)

    def one(messages: list[dict[str, str]]) -> None:
        try:
            count, ttft, gaps = stream_one(base, messages, max_tokens, name == "ours")
        except Exception:  # a dropped or failed request is counted, not fatal
            result.errors += 1
            return
        result.tokens += count
        result.ttft_s.append(ttft)
        result.itl_s.extend(gaps)

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=n) as pool:
        list(pool.map(one, prompts(n, words)))
    result.seconds = time.perf_counter() - started
    return result


def multi_turn(model_dir: Path, history_words: int) -> dict[str, float]:
    """TTFT of a long conversation cold, then of its next turn (prefix cache warm)."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mlx_engine_server",
        str(model_dir),
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process)
        stream_one(base, prompts(1, 20)[0], 4, True)
        history = [
            {
                "role": "user",
                "content": " ".join(WORDS[j % len(WORDS)] for j in range(history_words)),
            }
        ]
        _, cold, _ = stream_one(base, history, 16, True)
        history += [
            {"role": "assistant", "content": "noted"},
            {"role": "user", "content": "and then?"},
        ]
        _, warm, _ = stream_one(base, history, 16, True)
        return {
            "cold_ttft_s": round(cold, 4),
            "next_turn_ttft_s": round(warm, 4),
            "ratio": round(warm / cold, 3),
        }
    finally:
        process.terminate()
        process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=200)
    parser.add_argument("--quantize", type=int, default=0)
    parser.add_argument("--history-words", type=int, default=3000)
    parser.add_argument("--skip", default="", help="comma list of: raw,ours,mlx_lm,multi")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    clients = [int(n) for n in args.clients.split(",")]
    skip = set(args.skip.split(","))
    work = Path(tempfile.mkdtemp(prefix="mlx-bench-"))
    model_dir = build_model(args.shape, args.tokenizer, work / args.shape, args.quantize)
    results: list[Result] = []
    if "raw" not in skip:
        results += run_raw(model_dir, clients, args.prompt_words, args.max_tokens)
    servers = {
        "ours": [
            sys.executable,
            "-m",
            "mlx_engine_server",
            str(model_dir),
            "--log-level",
            "warning",
            "--port",
        ],
        "mlx_lm.server": [
            sys.executable,
            "-m",
            "mlx_lm.server",
            "--model",
            str(model_dir),
            "--port",
        ],
    }
    for name, command in servers.items():
        if name.split(".")[0] not in skip:
            port = free_port()
            results += run_server(
                name, [*command, str(port)], port, clients, args.prompt_words, args.max_tokens
            )
    report = {"device": str(mx.default_device()), "shape": args.shape, "quantize": args.quantize,
              "max_tokens": args.max_tokens, "prompt_words": args.prompt_words,
              "results": [r.summary() for r in results]}  # fmt: skip
    if "multi" not in skip:
        report["multi_turn"] = multi_turn(model_dir, args.history_words)
    print_report(results, report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    shutil.rmtree(work, ignore_errors=True)


def print_report(results: list[Result], report: dict[str, Any]) -> None:
    print(f"{report['device']} shape={report['shape']} quantize={report['quantize']} "
          f"max_tokens={report['max_tokens']} prompt_words={report['prompt_words']}")  # fmt: skip
    by_key = {(r.system, r.clients): r for r in results}
    for r in results:
        s = r.summary()
        raw = by_key.get(("raw mlx-lm", r.clients))
        theirs = by_key.get(("mlx_lm.server", r.clients))
        vs_raw = f"{r.tokens_per_s / raw.tokens_per_s:.2f}x raw" if raw else ""
        vs_theirs = f"{r.tokens_per_s / theirs.tokens_per_s:.2f}x mlx_lm.server" if theirs else ""
        latency = (
            f"ttft p50/p99 {s['ttft_p50_s']}/{s['ttft_p99_s']} s "
            f"itl p50/p99 {s['itl_p50_ms']}/{s['itl_p99_ms']} ms"
        )
        line = f"{s['system']:>14} n={s['clients']:>3} {s['tok_per_s']:>8} tok/s {latency}"
        print(f"{line} errors {s['errors']}  {vs_raw} {vs_theirs}")
    if "multi_turn" in report:
        print("multi-turn:", report["multi_turn"])


if __name__ == "__main__":
    main()
