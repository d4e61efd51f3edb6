"""The first request after start-up, token by token, with MLX's CUDA kernel cache beside it.

    MLX_PTX_CACHE_DIR=/tmp/ptx python benchmarks/first_request.py --model llama3-8b --quantize 4

Loads the model into our engine in this process, then sends one greedy request (a prompt of about
--prompt-words words, --max-tokens tokens) and a second one like it, and prints for each the time
of every --every-th token and the number of files in $MLX_PTX_CACHE_DIR (one per kernel NVRTC
compiled); then the names of the newest kernels. A first request much slower than the second,
with the cache growing as it goes, names per-shape kernel compilation as the warm-up cost.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

from in_process import InProcessEngine
from load import encode, make_messages
from mlx_lm import load
from models import add_model_arguments, resolve_model

from mlx_engine_server.engine.messages import (
    EngineOptions,
    Event,
    Failed,
    Finished,
    SamplingParams,
    TextDelta,
)


def kernel_files() -> list[Path]:
    root = os.environ.get("MLX_PTX_CACHE_DIR")
    if not root or not Path(root).is_dir():
        return []
    return sorted(
        (p for p in Path(root).rglob("*") if p.is_file()), key=lambda p: p.stat().st_mtime
    )


def one_request(engine: InProcessEngine, prompt: list[int], max_tokens: int, every: int) -> None:
    done = threading.Event()
    started = time.perf_counter()
    seen = [0]

    def post(event: Event) -> None:
        if isinstance(event, TextDelta):
            before = seen[0]
            seen[0] += len(event.token_ids)
            if seen[0] // every != before // every or before == 0:
                elapsed = time.perf_counter() - started
                print(f"  token {seen[0]:>4}: {elapsed:7.2f} s, {len(kernel_files())} kernels")
        elif isinstance(event, Finished | Failed):
            done.set()

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    engine.submit(prompt, params, post)
    done.wait()
    wall = time.perf_counter() - started
    print(f"  {seen[0]} tokens in {wall:.2f} s ({seen[0] / wall:.1f} tok/s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-words", type=int, default=200)
    parser.add_argument("--every", type=int, default=16)
    args = parser.parse_args()
    model_dir = resolve_model(args.model, args.cache_dir, args.quantize)
    tokenizer = load(str(model_dir))[1]
    began = time.perf_counter()
    engine = InProcessEngine(model_dir, EngineOptions())
    engine.start()
    print(f"loaded in {time.perf_counter() - began:.1f} s; {len(kernel_files())} kernels")
    for label in ("first", "second"):
        print(f"{label} request:", flush=True)
        prompt = encode(tokenizer, make_messages(label, 0, args.prompt_words))
        one_request(engine, prompt, args.max_tokens, args.every)
    engine.stop()
    print("newest kernels:", *[path.name[:160] for path in kernel_files()[-12:]], sep="\n  ")


if __name__ == "__main__":
    main()
