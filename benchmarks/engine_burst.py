"""A burst of N requests through our engine in-process (no HTTP), against raw batch_generate.

    python benchmarks/engine_burst.py --model smollm2-1.7b --clients 64 --max-tokens 128

Splits the gap between load.py's server figures and raw mlx-lm into the engine's part and the
HTTP side's: the same prompts as load.py (about --prompt-words words each), all submitted at once,
greedy, EOS ignored. Prints, for our engine, output tok/s over the burst (prefill included),
admission / first token / end percentiles, and where the worker's time went: BatchGenerator.next()
calls (prefill-carrying and decode-only) against time outside them; then raw batch_generate's
tok/s on the same prompts, measured in the same process after a warm-up burst of each.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from in_process import InProcessEngine
from load import encode, make_messages
from mlx_lm import load
from mlx_lm.generate import BatchGenerator, batch_generate
from models import add_model_arguments, resolve_model

from mlx_engine_server.engine import (
    Admitted,
    EngineOptions,
    Finished,
    SamplingParams,
    TextDelta,
)


@dataclass
class Timeline:
    admitted: float = 0.0
    first_token: float = 0.0
    end: float = 0.0
    tokens: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    def post(self, event: object) -> None:
        now = time.perf_counter()
        if isinstance(event, Admitted):
            self.admitted = now
        elif isinstance(event, TextDelta):
            self.first_token = self.first_token or now
            self.tokens += len(event.token_ids)
        else:
            assert isinstance(event, Finished), event
            self.end = now
            self.done.set()


@dataclass
class StepLog:
    # Each next() call: start, end, rows decoding, prompts in prefill.
    calls: list[tuple[float, float, int, int]] = field(default_factory=list)

    def install(self) -> None:
        original = BatchGenerator.next
        log = self

        def timed(generator: BatchGenerator) -> Any:
            prompting = len(generator._prompt_batch) if generator._prompt_batch else 0
            started = time.perf_counter()
            result = original(generator)
            log.calls.append(
                (started, time.perf_counter(), len(generator._generation_batch), prompting)
            )
            return result

        BatchGenerator.next = timed  # type: ignore[method-assign]


def burst(
    engine: InProcessEngine, prompts: list[list[int]], max_tokens: int
) -> tuple[float, list[Timeline]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    timelines = [Timeline() for _ in prompts]
    started = time.perf_counter()
    for prompt, timeline in zip(prompts, timelines, strict=True):
        engine.submit(prompt, params, timeline.post)
    for timeline in timelines:
        timeline.done.wait()
    return started, timelines


def report(started: float, timelines: list[Timeline], steps: StepLog) -> None:
    wall = max(t.end for t in timelines) - started
    tokens = sum(t.tokens for t in timelines)
    print(f"our engine: {tokens / wall:.1f} tok/s ({tokens} tokens in {wall:.2f} s)")
    for phase in ("admitted", "first_token", "end"):
        times = sorted(getattr(t, phase) - started for t in timelines)
        median = statistics.median(times)
        print(f"  {phase:<12} min {times[0]:.3f}  p50 {median:.3f}  max {times[-1]:.3f} s")
    calls = [c for c in steps.calls if c[0] >= started]
    inside = sum(end - start for start, end, _, _ in calls)
    prefill = [c for c in calls if c[3]]
    print(
        f"  worker: {len(calls)} next() calls, {inside:.2f} s inside them "
        f"({len(prefill)} carrying prefill: {sum(e - s for s, e, _, _ in prefill):.2f} s), "
        f"{wall - inside:.2f} s outside"
    )
    first_decode = next((c for c in calls if not c[3] and c[2] == len(timelines)), None)
    if first_decode is not None:
        print(f"  all rows decoding from {first_decode[0] - started:.3f} s")
    decode = [e - s for s, e, rows, p in calls if not p and rows == len(timelines)]
    if decode:
        print(f"  full-batch decode step p50 {statistics.median(decode) * 1e3:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-words", type=int, default=200)
    args = parser.parse_args()
    model_dir = resolve_model(args.model, args.cache_dir, args.quantize)
    model, tokenizer = load(str(model_dir))[:2]
    tokenizer.eos_token_ids = []

    def prompts(salt: str) -> list[list[int]]:
        words = args.prompt_words
        return [encode(tokenizer, make_messages(salt, i, words)) for i in range(args.clients)]

    steps = StepLog()
    steps.install()
    engine = InProcessEngine(
        model_dir, EngineOptions(max_batch_size=args.clients, max_queue=args.clients)
    )
    engine.start()
    burst(engine, prompts("warm-up"), 4)
    report(*burst(engine, prompts("measured"), args.max_tokens), steps)
    engine.stop()
    extra = {"completion_batch_size": args.clients}
    batch_generate(model, tokenizer, prompts("raw-warm-up"), max_tokens=4, **extra)
    started = time.perf_counter()
    out = batch_generate(
        model, tokenizer, prompts("raw"), max_tokens=args.max_tokens, return_token_ids=True, **extra
    )
    wall = time.perf_counter() - started
    tokens = sum(len(ids) for ids in out.token_ids)
    print(f"raw batch_generate: {tokens / wall:.1f} tok/s ({tokens} tokens in {wall:.2f} s)")


if __name__ == "__main__":
    main()
