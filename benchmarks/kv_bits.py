"""`--kv-bits 8` and `--kv-bits 4` against a 16-bit KV cache, every figure measured in one run:
the requests that fit a fixed KV budget, greedy agreement over a fixed prompt set, and speed.

    .venv/bin/python benchmarks/kv_bits.py [MODEL_PATH] [--max-tokens 48] [--dtype bfloat16]
        [--budget-mib 256] [--request-tokens 1024] [--prompts 16] [--stream-prompts 2]
        [--dequantize]

Four real `mlx-server` processes serve the model, one after another:

    float32   --dtype float32 (the CPU's default), the full-precision reference
    16-bit    --dtype bfloat16 (--dtype float16 with --dtype float16): the 16-bit cache
    kv8       --dtype bfloat16 --kv-bits 8
    kv4       --dtype bfloat16 --kv-bits 4

For each: the KV bytes per token that the engine's admission measured at start-up, and so the
requests of --request-tokens tokens (prompt and output) that fit in --budget-mib of KV room;
every prompt of `quality_prompts.json` (chat, code, lists, facts) sent at once, greedy,
--max-tokens each, with logprobs: the tokens, and tokens/s over that many clients; then
--stream-prompts of them one at a time: decode tokens/s of one stream.

Agreement of a run with its baseline over the prompt set: answers identical token for token;
the mean common prefix in tokens; and at each first divergence, whether the baseline's token was
the run's own second choice (a near tie), and the mean logprob gap between the two there.

MODEL_PATH defaults to the bundled SmolLM2-135M (real weights). On the CPU, MLX's quantized matmul
is about ten times slower with 16-bit than with float32 inputs; --dequantize serves every run
from a dequantized copy of the weights (the same values, as floats), whose 16-bit matmul is not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx
from mlx_lm import convert
from speculative import server, status

from mlx_engine_server.models.gguf import convert_gguf, is_gguf_file
from mlx_engine_server.models.loader import bundled_model_path

PROMPTS = Path(__file__).with_name("quality_prompts.json")
MIB = 2**20
TOP = 2  # logprobs asked for: the chosen token and the runner-up

Token = tuple[int, ...]  # a generated token, as its bytes


@dataclass(frozen=True)
class Answer:
    tokens: list[Token]
    alternatives: list[dict[Token, float]]  # per position: top tokens and their logprobs
    decode_s: float  # first token to last


@dataclass(frozen=True)
class Run:
    name: str
    kv_bytes_per_token: int
    answers: list[Answer]  # the prompt set, sent at once
    clients_rate: float  # tokens/s over those clients
    stream_rate: float  # decode tokens/s, one request at a time


@dataclass(frozen=True)
class Agreement:
    identical: int
    answers: int
    mean_prefix: float
    mean_length: float
    divergences: int  # answers that part before either ends
    runner_up: int  # of those, where the baseline's token was this run's second choice
    mean_gap: float  # logprob of this run's token minus the baseline's token's, there


def ask(base_url: str, prompt: str, max_tokens: int) -> Answer:
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "logprobs": True,
        "top_logprobs": TOP,
    }
    tokens: list[Token] = []
    alternatives: list[dict[Token, float]] = []
    first = last = 0.0
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=3600) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            for entry in (choices[0].get("logprobs") or {}).get("content") or []:
                tokens.append(tuple(entry["bytes"]))
                alternatives.append(
                    {tuple(t["bytes"]): t["logprob"] for t in entry["top_logprobs"]}
                )
                last = time.perf_counter()
                first = first or last
    return Answer(tokens, alternatives, max(last - first, 1e-9))


def measure(model: Path, name: str, flags: tuple[str, ...], args: argparse.Namespace) -> Run:
    prompts = [item["prompt"] for item in json.loads(PROMPTS.read_text(encoding="utf-8"))]
    prompts = prompts[: args.prompts]
    with server(model, "--max-batch-size", str(len(prompts)), *flags) as base_url:
        per_token = status(base_url)["memory_budget"]["kv_bytes_per_token"]
        ask(base_url, "hi", 4)  # warm-up
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
            answers = list(pool.map(lambda p: ask(base_url, p, args.max_tokens), prompts))
        clients_rate = sum(len(a.tokens) for a in answers) / (time.perf_counter() - started)
        streams = [ask(base_url, p, args.max_tokens) for p in prompts[: args.stream_prompts]]
    stream_rate = sum(len(a.tokens) - 1 for a in streams) / sum(a.decode_s for a in streams)
    print(f"  measured {name} ({' '.join(flags)})", flush=True)
    return Run(name, per_token, answers, clients_rate, stream_rate)


def common_prefix(a: list[Token], b: list[Token]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def agreement(run: Run, baseline: Run) -> Agreement:
    prefixes, gaps = [], []
    for mine, theirs in zip(run.answers, baseline.answers, strict=True):
        at = common_prefix(mine.tokens, theirs.tokens)
        prefixes.append(at)
        if at < min(len(mine.tokens), len(theirs.tokens)):
            top = mine.alternatives[at]
            if theirs.tokens[at] in top:
                gaps.append(top[mine.tokens[at]] - top[theirs.tokens[at]])
    pairs = list(zip(run.answers, baseline.answers, strict=True))
    parted = sum(
        common_prefix(a.tokens, b.tokens) < min(len(a.tokens), len(b.tokens)) for a, b in pairs
    )
    return Agreement(
        identical=sum(a.tokens == b.tokens for a, b in pairs),
        answers=len(run.answers),
        mean_prefix=statistics.mean(prefixes),
        mean_length=statistics.mean(len(a.tokens) for a in baseline.answers),
        divergences=parted,
        runner_up=len(gaps),
        mean_gap=statistics.mean(gaps) if gaps else 0.0,
    )


def report_rows(runs: dict[str, Run], args: argparse.Namespace) -> None:
    room = args.budget_mib * MIB
    base = runs["16-bit"]
    print(
        f"\nKV bytes per token (the engine's admission, measured at start-up) and requests of "
        f"{args.request_tokens} tokens that fit in {args.budget_mib} MiB of KV room:"
    )
    for run in runs.values():
        rows = room // (args.request_tokens * run.kv_bytes_per_token)
        base_rows = room // (args.request_tokens * base.kv_bytes_per_token)
        versus = (
            f"{rows / max(base_rows, 1):.2f}x the 16-bit rows"
            + ("  (target >= 1.8x)" if run.name == "kv8" else "")
            if run is not base
            else "(baseline)"
        )
        print(f"  {run.name:8} {run.kv_bytes_per_token:>8,} B/token {rows:>5} rows   {versus}")


def report_agreement(runs: dict[str, Run], args: argparse.Namespace) -> None:
    count = len(runs["16-bit"].answers)
    print(f"\ngreedy agreement, {count} prompts ({PROMPTS.name}), up to {args.max_tokens} tokens:")
    print(
        "  run      against  identical  common prefix (mean tokens)  "
        "first divergence: baseline's token the runner-up, mean logprob gap"
    )
    pairs = [("16-bit", "float32"), ("kv8", "16-bit"), ("kv8", "float32")]
    pairs += [("kv4", "16-bit"), ("kv4", "float32")]
    for name, against in pairs:
        found = agreement(runs[name], runs[against])
        print(
            f"  {name:8} {against:8} {found.identical:>4}/{found.answers:<5} "
            f"{found.mean_prefix:6.1f} of {found.mean_length:5.1f}                "
            f"{found.runner_up}/{found.divergences}, {found.mean_gap:.3f}"
        )


def report_speed(runs: dict[str, Run], args: argparse.Namespace) -> None:
    base = runs["16-bit"]
    clients = len(base.answers)
    print(
        f"\nspeed: decode tokens/s of one stream ({args.stream_prompts} prompts one at a time), "
        f"tokens/s over {clients} clients at once:"
    )
    for run in runs.values():
        print(
            f"  {run.name:8} one stream {run.stream_rate:7.2f} "
            f"({100 * (run.stream_rate / base.stream_rate - 1):+6.1f} % vs 16-bit)   "
            f"{clients} clients {run.clients_rate:7.2f} "
            f"({100 * (run.clients_rate / base.clients_rate - 1):+6.1f} % vs 16-bit"
            + ("; target >= -10 %)" if run.name == "kv8" else ")")
        )


def dequantized(model: Path) -> Path:
    """A float copy of a quantized model directory, made once beside it."""
    dest = model.with_name(f"{model.name}-dequantized")
    if not (dest / "config.json").is_file():
        convert(str(model), str(dest), dequantize=True)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_path", nargs="?")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--prompts", type=int, default=16, help="prompts used, of the set")
    parser.add_argument("--stream-prompts", type=int, default=2)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--budget-mib", type=int, default=256, help="KV room of the budget")
    parser.add_argument("--request-tokens", type=int, default=1024)
    parser.add_argument(
        "--dequantize", action="store_true", help="serve a dequantized copy of the weights"
    )
    args = parser.parse_args()
    model = Path(args.model_path) if args.model_path else bundled_model_path()
    if is_gguf_file(model):
        model = convert_gguf(model, Path(tempfile.gettempdir()) / "mlx-bench-cache")
    if args.dequantize:
        model = dequantized(model)
    half = ("--dtype", args.dtype)
    configs: dict[str, tuple[str, ...]] = {
        "float32": ("--dtype", "float32"),
        "16-bit": half,
        "kv8": (*half, "--kv-bits", "8"),
        "kv4": (*half, "--kv-bits", "4"),
    }
    runs = {name: measure(model, name, flags, args) for name, flags in configs.items()}
    report_rows(runs, args)
    report_agreement(runs, args)
    report_speed(runs, args)


if __name__ == "__main__":
    main()
