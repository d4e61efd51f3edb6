"""Where a single stream's time goes: raw mlx-lm, its BatchGenerator, and our engine in-process.

    python benchmarks/single_stream.py --model smollm2-1.7b --max-tokens 256 --repeat 5

One greedy prompt of about --prompt-words words, --max-tokens tokens (EOS ignored), measured in
the same process and run, median of --repeat:
(a) `stream_generate` — mlx-lm's single-stream loop, the figure the issue compares against;
(b) mlx-lm's `BatchGenerator` stepping one sequence — what our worker builds on;
(c) our `Engine` in-process (worker thread, detokenizer, stop filter, events) without HTTP.
load.py's one-client row adds HTTP and SSE on top of (c). Each row prints decode ms/token
(first token excluded) and its ratio to (a), so the gap splits into mlx-lm's batching layer,
our worker, and the HTTP path.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
from in_process import InProcessEngine
from mlx_lm import load, stream_generate
from mlx_lm.generate import BatchGenerator
from models import add_model_arguments, resolve_model

from mlx_engine_server.engine import (
    Admitted,
    EngineOptions,
    Finished,
    SamplingParams,
    TextDelta,
)

Timings = list[float]


def prompt_tokens(tokenizer: Any, words: int) -> list[int]:
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * (words // 9 + 1))
    messages = [{"role": "user", "content": f"Summarise: {text}"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(rendered, add_special_tokens=False))


def run_stream_generate(model: Any, tokenizer: Any, prompt: list[int], max_tokens: int) -> Timings:
    tokenizer.eos_token_ids = []
    return [time.perf_counter() for _ in stream_generate(model, tokenizer, prompt, max_tokens)]


def run_batch_generator(model: Any, prompt: list[int], max_tokens: int) -> Timings:
    generator = BatchGenerator(model, stop_tokens=[], completion_batch_size=32)
    arrivals: Timings = []
    with mx.stream(generator.stream):
        generator.insert([prompt], max_tokens=[max_tokens])
    done = False
    while not done:
        _, responses = generator.next()
        for response in responses:
            arrivals.append(time.perf_counter())
            done = done or response.finish_reason is not None
    generator.close()
    return arrivals


def run_engine(engine: InProcessEngine, prompt: list[int], max_tokens: int) -> Timings:
    arrivals: Timings = []
    finished = threading.Event()

    def post(event: object) -> None:
        if isinstance(event, TextDelta):
            arrivals.extend([time.perf_counter()] * len(event.token_ids))
        elif not isinstance(event, Admitted):
            finished.set()
            assert isinstance(event, Finished), event

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    engine.submit(prompt, params, post)
    finished.wait()
    return arrivals


def measure(name: str, run: Callable[[], Timings], repeat: int) -> dict[str, float]:
    rows = []
    for _ in range(repeat):
        started = time.perf_counter()
        arrivals = run()
        decode = (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1)
        rows.append(
            {
                "ttft_ms": (arrivals[0] - started) * 1e3,
                "decode_ms_per_token": decode * 1e3,
                "tok_per_s": len(arrivals) / (arrivals[-1] - started),
            }
        )
    median = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
    print(f"  {name}: {median}", flush=True)
    return median


def measure_raw(
    model_dir: Path, args: argparse.Namespace
) -> tuple[dict[str, dict[str, float]], list[int]]:
    model, tokenizer = load(str(model_dir))[:2]
    prompt = prompt_tokens(tokenizer, args.prompt_words)
    results = {
        "stream_generate": measure(
            "stream_generate",
            lambda: run_stream_generate(model, tokenizer, prompt, args.max_tokens),
            args.repeat,
        ),
        "BatchGenerator": measure(
            "BatchGenerator x1",
            lambda: run_batch_generator(model, prompt, args.max_tokens),
            args.repeat,
        ),
    }
    return results, prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--prompt-words", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    model_dir = resolve_model(args.model, args.cache_dir, args.quantize)
    print(f"{model_dir} on {mx.default_device()}", flush=True)

    results, prompt = measure_raw(model_dir, args)
    engine = InProcessEngine(model_dir, EngineOptions(prefix_cache_bytes=0))
    engine.start()
    results["our engine"] = measure(
        "our engine", lambda: run_engine(engine, prompt, args.max_tokens), args.repeat
    )
    engine.stop()

    base = results["stream_generate"]["decode_ms_per_token"]
    header = f"{'system':<18}{'TTFT ms':>9}{'decode ms/tok':>15}{'tok/s':>9}"
    print(f"\n{header}{'vs stream_generate':>20}")
    for name, row in results.items():
        print(
            f"{name:<18}{row['ttft_ms']:>9.1f}{row['decode_ms_per_token']:>15.3f}"
            f"{row['tok_per_s']:>9.1f}{base / row['decode_ms_per_token']:>20.3f}"
        )


if __name__ == "__main__":
    main()
