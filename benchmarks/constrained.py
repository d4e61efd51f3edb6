"""The per-token cost of constrained decoding, next to unconstrained decoding in the same run.

    python benchmarks/constrained.py [--model smollm2-gguf] [--batch 1 8] [--tokens 64]

For each batch size, the engine generates `--tokens` tokens per row three ways: free (ignore_eos),
constrained by a JSON schema that fixes the output length (an array of exactly N one-digit
integers: every row emits the same number of tokens), and half the rows constrained beside free
ones. It prints decode ms per step and output tok/s for each, and the constraint's extra cost per
constrained token. The grammar's one-off setup (the vocabulary, once per process, and the matcher,
once per request) is timed separately, by a warm-up request before the timed runs.
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import time
from dataclasses import dataclass

from in_process import InProcessEngine
from models import resolve_model

from mlx_engine_server.chat.structured import json_schema_grammar
from mlx_engine_server.engine import (
    EngineOptions,
    Event,
    Failed,
    Finished,
    SamplingParams,
)

PROMPT = "List some digits:"


@dataclass(frozen=True)
class Run:
    label: str
    rows: int
    constrained_rows: int
    seconds: float
    tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def ms_per_step(self) -> float:
        return 1000 * self.seconds / (self.tokens / self.rows)


def digits_grammar(count: int) -> str:
    schema = {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 9},
        "minItems": count,
        "maxItems": count,
    }
    return json_schema_grammar(schema)


def generate(
    engine: InProcessEngine, prompt: list[int], params: list[SamplingParams]
) -> tuple[float, int]:
    """Wall seconds and completion tokens for rows submitted together."""
    events: queue.Queue[Event] = queue.Queue()
    started = time.perf_counter()
    engine.submit_all([(prompt, row, events.put) for row in params])
    tokens = 0
    for _ in params:
        event = events.get()
        while not isinstance(event, Finished | Failed):
            event = events.get()
        if isinstance(event, Failed):
            raise RuntimeError(event.message)
        tokens += event.usage.completion_tokens
    return time.perf_counter() - started, tokens


def rows_for(rows: int, constrained: int, tokens: int, grammar: str) -> list[SamplingParams]:
    free = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    # The array of N digits is 2N tokens ("[" and N-1 "d," pairs and "d]"), then EOS.
    fixed = SamplingParams(max_tokens=tokens + 1, temperature=0, grammar=grammar)
    return [fixed] * constrained + [free] * (rows - constrained)


def measure(
    engine: InProcessEngine, prompt: list[int], rows: int, tokens: int, repeat: int
) -> list[Run]:
    grammar = digits_grammar(tokens // 2)
    runs = []
    for label, constrained in (("free", 0), ("constrained", rows), ("half", rows // 2)):
        if label == "half" and rows < 2:
            continue
        samples = [
            generate(engine, prompt, rows_for(rows, constrained, tokens, grammar))
            for _ in range(repeat)
        ]
        seconds, count = sorted(samples)[len(samples) // 2]
        runs.append(Run(label, rows, constrained, seconds, count))
    return runs


def warm_up(engine: InProcessEngine, prompt: list[int]) -> dict[str, float]:
    started = time.perf_counter()
    generate(
        engine, prompt, [SamplingParams(max_tokens=4, temperature=0, grammar=digits_grammar(2))]
    )
    first = time.perf_counter() - started
    started = time.perf_counter()
    generate(
        engine, prompt, [SamplingParams(max_tokens=4, temperature=0, grammar=digits_grammar(2))]
    )
    return {
        "first_constrained_request_s": first,
        "next_constrained_request_s": time.perf_counter() - started,
    }


def report(runs: list[Run]) -> list[dict[str, float | int | str]]:
    free = next(run for run in runs if run.label == "free")
    lines = []
    for run in runs:
        extra_ms = (run.ms_per_step - free.ms_per_step) / max(run.constrained_rows, 1)
        line = {
            "rows": run.rows,
            "run": run.label,
            "constrained_rows": run.constrained_rows,
            "ms_per_step": round(run.ms_per_step, 3),
            "tokens_per_s": round(run.tokens_per_s, 1),
            "extra_ms_per_constrained_token": round(extra_ms, 3) if run.constrained_rows else 0.0,
        }
        print(
            f"batch {run.rows:3d} {run.label:12s} {run.ms_per_step:8.2f} ms/step "
            f"{run.tokens_per_s:8.1f} tok/s  +{line['extra_ms_per_constrained_token']} ms "
            "per constrained token"
        )
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-gguf")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    engine = InProcessEngine(resolve_model(args.model), EngineOptions(prefix_cache_bytes=0))
    engine.start()
    loaded = engine.host.loaded
    assert loaded is not None
    try:
        prompt = loaded.tokenizer.encode(PROMPT)
        setup = warm_up(engine, prompt)
        print(json.dumps(setup))
        figures = []
        for rows in args.batch:
            figures += report(measure(engine, prompt, rows, args.tokens, args.repeat))
    finally:
        engine.stop()
    summary = {"model": args.model, "tokens": args.tokens, "setup": setup, "runs": figures}
    print(
        "median extra ms per constrained token:",
        statistics.median(
            line["extra_ms_per_constrained_token"] for line in figures if line["constrained_rows"]
        ),
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(summary, out, indent=2)


if __name__ == "__main__":
    main()
