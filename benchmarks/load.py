"""Load generator: raw mlx-lm, this server and mlx_lm.server on the same model, in one run.

    python benchmarks/load.py --model tiny --clients 1,8 --max-tokens 64 --prompt-words 200 \\
        [--multi-turn --history-tokens 4000] [--json out.json] [--plot out.png]

For each number of clients N, the same N distinct chat prompts of about --prompt-words words go to
(a) raw mlx-lm in this process (`stream_generate` for one, `batch_generate` for N), (b) this server
(`mlx-server`, requests with `ignore_eos: true`) and (c) `python -m mlx_lm.server`, each as a real
process on a free port, greedy, --max-tokens each. Raw mlx-lm runs with its tokenizer's
end-of-sequence set emptied, so it generates --max-tokens too; mlx_lm.server cannot ignore EOS, so
its tokens are counted as streamed (its `usage`). Output tok/s counts every generated token over
the wall time from the first request sent to the last byte received, prefill included. TTFT and
inter-token latency come from SSE chunk arrival times (raw `batch_generate` has neither). CPU
ms/tok is the generating process's CPU time (the server's, from /proc; this process's for raw) per
output token. --repeat R runs each point R times with fresh prompts and keeps the median run.

--multi-turn measures, on this server only, the TTFT of a cold request carrying a history of about
--history-tokens tokens against the TTFT of the next turn that extends it (prefix cache warm).
--model: see benchmarks/models.py (`tiny`, `smollm2-1.7b`, `llama3-8b`, `smollm2-gguf`, a .gguf
file or an mlx-lm directory). Works on a CPU and on CUDA: MLX's default device is used throughout.
Results table, ratios, targets, JSON and plot live in this one file (over the ~400-line budget) so
that the benchmark stays one command to copy to a GPU machine; models.py is its only companion.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import multiprocessing
import os
import platform
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import httpx2 as httpx
import mlx.core as mx
from mlx_lm import load, stream_generate
from mlx_lm.generate import batch_generate
from models import add_model_arguments, resolve_model

RAW, OURS, THEIRS = "raw mlx-lm", "mlx-engine-server", "mlx_lm.server"
SYSTEM_KEYS = {"raw": RAW, "ours": OURS, "mlx_lm": THEIRS}
_WORD_TEXT = (
    "time year people way day man thing woman life child world school state family student group "
    "country problem hand part place case week company system program question work government "
    "number night point home water room mother area money story fact month lot right study book "
    "eye job word business issue side kind head house service friend father power hour game line "
    "end member law car city community name president team minute idea kid body information back "
    "parent face others level office door health person art war history party result change "
    "morning reason research girl guy moment air teacher force education river garden lighthouse"
)
WORDS = _WORD_TEXT.split()
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Plan:
    model_dir: Path
    clients: tuple[int, ...]
    max_tokens: int
    prompt_words: int
    max_batch_size: int | None
    repeat: int
    server_flags: tuple[str, ...]
    log_dir: Path
    launch: tuple[str, ...] = ()  # a launcher our server runs under, e.g. mlx.launch ... --


@dataclass
class Stream:
    """What one streamed request gave back."""

    sent: float
    arrivals: list[float] = field(default_factory=list)
    text: str = ""
    usage: dict[str, Any] = field(default_factory=dict)
    done: bool = False
    error: str | None = None
    end: float = 0.0

    @property
    def tokens(self) -> int:
        return int(self.usage.get("completion_tokens", len(self.arrivals)))


@dataclass
class Measurement:
    system: str
    clients: int
    tokens: int
    wall_s: float
    errors: int = 0
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    cpu_s: float | None = None  # CPU time of the generating processes (Linux /proc), all threads
    front_cpu_s: float | None = None  # of the HTTP process alone (ours: without its engine)
    event_frames: int | None = None  # ours: engine steps handed to the front (status)
    event_send_s: float | None = None  # ours: the engine's time handing them over
    phase: str = "warm"  # or "first request", "first burst": right after start-up

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def summary(self) -> dict[str, Any]:
        ms = [x * 1000 for x in self.itl_s]
        return {
            "system": self.system,
            "clients": self.clients,
            "tokens": self.tokens,
            "wall_s": round(self.wall_s, 3),
            "tok_per_s": round(self.tokens_per_s, 2),
            "ttft_p50_s": percentile(self.ttft_s, 50),
            "ttft_p99_s": percentile(self.ttft_s, 99),
            "itl_p50_ms": percentile(ms, 50),
            "itl_p99_ms": percentile(ms, 99),
            "errors": self.errors,
            "cpu_ms_per_token": per_token_ms(self.cpu_s, self.tokens),
            "front_cpu_ms_per_token": per_token_ms(self.front_cpu_s, self.tokens),
            "ipc_us_per_step": round(1e6 * self.event_send_s / self.event_frames, 1)
            if self.event_send_s is not None and self.event_frames
            else None,
            "steps": self.event_frames,
            "phase": self.phase,
            "error_samples": self.error_samples[:3],
        }


def per_token_ms(cpu_s: float | None, tokens: int) -> float | None:
    return round(1000 * cpu_s / tokens, 2) if cpu_s is not None and tokens else None


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile, rounded for printing; None when there is nothing to rank."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return round(ordered[rank], 4)


def make_messages(salt: str, index: int, words: int) -> Messages:
    """A prompt of `words` words, distinct per (salt, index) from its first word on.

    Its own system message replaces the template's default one, so no system (and no prefix
    cache) gets a shared prefix beyond the template's first few tokens.
    """
    rng = random.Random(f"{salt}/{index}")
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return [
        {"role": "system", "content": f"{rng.choice(WORDS)} {salt} {index}"},
        {"role": "user", "content": f"{text}. Continue this text."},
    ]


# --- (a) raw mlx-lm, in this process ---------------------------------------------------------


def run_raw(plan: Plan) -> list[Measurement]:
    model, tokenizer = load(str(plan.model_dir))[:2]
    tokenizer.eos_token_ids = []  # generate max_tokens, as the servers asked to ignore EOS
    raw_single(model, tokenizer, encode(tokenizer, make_messages("warm-up", 0, 32)), 8)

    def one_run(n: int, repeat: int) -> Measurement:
        prompts = [encode(tokenizer, m) for m in batch_messages(n, repeat, plan)]
        # The servers had a warm-up request; on CUDA every new batch shape compiles kernels first.
        if repeat == 0:  # the servers get the same warm-up (see run_server)
            warm_up = [encode(tokenizer, m) for m in batch_messages(n, -1, plan)]
            raw_batch(model, tokenizer, warm_up, plan, max_tokens=4) if n > 1 else None
        if n == 1:
            return raw_single(model, tokenizer, prompts[0], plan.max_tokens)
        return raw_batch(model, tokenizer, prompts, plan)

    return [median_run(RAW, n, plan, one_run) for n in plan.clients]


def median_run(
    system: str, n: int, plan: Plan, one_run: Callable[[int, int], Measurement]
) -> Measurement:
    """The run of median tok/s among --repeat runs, each with its own prompts."""
    runs = sorted((one_run(n, k) for k in range(plan.repeat)), key=lambda m: m.tokens_per_s)
    rates = ", ".join(f"{m.tokens_per_s:.1f}" for m in runs)
    print(f"  {system} x{n}: {rates} tok/s", flush=True)
    note_phase(system, f"x{n}")
    return runs[len(runs) // 2]


def batch_messages(n: int, repeat: int, plan: Plan) -> list[Messages]:
    return [make_messages(f"clients-{n}-{repeat}", i, plan.prompt_words) for i in range(n)]


def encode(tokenizer: Any, messages: Messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer.encode(text, add_special_tokens=False))


def raw_single(model: Any, tokenizer: Any, prompt: list[int], max_tokens: int) -> Measurement:
    cpu, started = time.process_time(), time.perf_counter()
    arrivals = [time.perf_counter() for _ in stream_generate(model, tokenizer, prompt, max_tokens)]
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    wall = arrivals[-1] - started
    result = Measurement(RAW, 1, len(arrivals), wall, ttft_s=[arrivals[0] - started], itl_s=gaps)
    result.cpu_s = time.process_time() - cpu
    return result


def raw_batch(
    model: Any, tokenizer: Any, prompts: list[list[int]], plan: Plan, max_tokens: int = 0
) -> Measurement:
    extra = {"completion_batch_size": plan.max_batch_size} if plan.max_batch_size else {}
    max_tokens = max_tokens or plan.max_tokens
    cpu, started = time.process_time(), time.perf_counter()
    out = batch_generate(
        model, tokenizer, prompts, max_tokens=max_tokens, return_token_ids=True, **extra
    )
    wall = time.perf_counter() - started
    result = Measurement(RAW, len(prompts), sum(len(ids) for ids in out.token_ids), wall)
    result.cpu_s = time.process_time() - cpu
    return result


# --- (b), (c) servers as processes -----------------------------------------------------------


def server_command(system: str, plan: Plan, port: int) -> list[str]:
    batch = plan.max_batch_size
    if system == OURS:
        command = [*plan.launch, sys.executable, "-m", "mlx_engine_server", str(plan.model_dir)]
        command += ["--port", str(port)]
        command += ["--log-level", "warning", *plan.server_flags]
        return command + (["--max-batch-size", str(batch)] if batch else [])
    command = [sys.executable, "-m", "mlx_lm.server", "--model", str(plan.model_dir)]
    command += ["--port", str(port), "--temp", "0", "--log-level", "WARNING"]
    return command + (["--decode-concurrency", str(batch)] if batch else [])


class Server:
    """A server process on a free loopback port, killed on exit from the `with` block."""

    def __init__(self, system: str, plan: Plan) -> None:
        self.system = system
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        self.base = f"http://127.0.0.1:{port}"
        self.command = server_command(system, plan, port)
        self.log_path = plan.log_dir / f"{system}.log"

    def __enter__(self) -> Server:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(  # noqa: S603 - our own command line
                self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(f"{self.base}/v1/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"{self.system} did not start; see {self.log_path}")

    def __exit__(self, *_: object) -> None:
        # The whole session: a launcher's ranks end with it.
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def chat(self, messages: Messages, max_tokens: int) -> Stream:
        return chat(self.base, self.system, messages, max_tokens)


def chat(base: str, system: str, messages: Messages, max_tokens: int) -> Stream:
    """One greedy streaming chat request, read to its last byte."""
    body: dict[str, Any] = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if system == OURS:
        body["ignore_eos"] = True
    stream = Stream(sent=time.perf_counter())
    try:
        read_sse(base, body, stream)
    except (httpx.HTTPError, ValueError) as exc:
        stream.error = f"{type(exc).__name__}: {exc}"
    stream.end = time.perf_counter()
    if stream.error is None and not stream.done:
        stream.error = "the stream ended without data: [DONE]"
    return stream


def read_sse(base: str, body: dict[str, Any], stream: Stream) -> None:
    url = f"{base}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, timeout=1800) as reply:
        if reply.status_code != 200:
            stream.error = f"HTTP {reply.status_code}: {reply.read()[:200]!r}"
            return
        for line in reply.iter_lines():
            if line == "data: [DONE]":
                stream.done = True
            elif line.startswith("data: "):
                take_chunk(json.loads(line[len("data: ") :]), stream)


def take_chunk(chunk: dict[str, Any], stream: Stream) -> None:
    if "error" in chunk:
        stream.error = f"error event: {json.dumps(chunk['error'])[:200]}"
    stream.usage = chunk.get("usage") or stream.usage
    text = "".join((c.get("delta") or {}).get("content") or "" for c in chunk.get("choices") or [])
    if text:
        stream.arrivals.append(time.perf_counter())
        stream.text += text


def process_cpu_s(pid: int) -> float | None:
    """User plus system CPU seconds of a process, from /proc (None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """A process's children (our engine process), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def engine_figures(server: Server) -> tuple[int, float] | None:
    """Ours: steps handed from the engine to the front so far, and the time that took."""
    if server.system != OURS:
        return None
    engine = httpx.get(f"{server.base}/v1/mlx/status", timeout=10).json()["engine"]
    return int(engine["event_frames"]), float(engine["event_send_s"])


def kernel_cache_files() -> int | None:
    """Files in MLX's CUDA kernel cache (MLX_PTX_CACHE_DIR, when set): one per kernel that
    NVRTC compiled. Printed after each phase, a count that keeps growing names a warm-up cost."""
    root = os.environ.get("MLX_PTX_CACHE_DIR")
    if not root or not Path(root).is_dir():
        return None
    return sum(1 for path in Path(root).rglob("*") if path.is_file())


def note_phase(system: str, label: str) -> None:
    count = kernel_cache_files()
    if count is not None:
        print(f"  {system} after {label}: {count} files in the CUDA kernel cache", flush=True)


def cold_start(server: Server, plan: Plan) -> list[Measurement]:
    """The first request after start-up, then the first burst of the most clients: compiles and
    caches that only the first use pays show here, against the warm runs of the same size."""
    note_phase(server.system, "start-up")
    first = measure(server, batch_messages(1, -2, plan), plan.max_tokens)
    note_phase(server.system, f"the first request ({first.wall_s:.2f} s)")
    burst = measure(server, batch_messages(max(plan.clients), -3, plan), plan.max_tokens)
    note_phase(server.system, f"the first burst ({burst.wall_s:.2f} s)")
    first.phase, burst.phase = "first request", "first burst"
    return [first, burst]


def run_server(system: str, plan: Plan) -> list[Measurement]:
    with Server(system, plan) as server:
        cold = cold_start(server, plan)
        server.chat(make_messages("warm-up", 0, plan.prompt_words), 8)

        def one_run(n: int, repeat: int) -> Measurement:
            if repeat == 0:  # as for raw: the first batch of n compiles its kernels (CUDA)
                measure(server, batch_messages(n, -1, plan), 4)
            return measure(server, batch_messages(n, repeat, plan), plan.max_tokens)

        return cold + [median_run(system, n, plan, one_run) for n in plan.clients]


def measure(server: Server, batch: list[Messages], max_tokens: int) -> Measurement:
    """All requests released together; wall time from then to the last byte.

    The clients are spread over processes of at most CLIENTS_PER_PROCESS threads: one Python
    process reading 64 streams is itself CPU-bound (its threads share one GIL), and would
    measure itself rather than the server.
    """
    groups = [batch[i : i + CLIENTS_PER_PROCESS] for i in range(0, len(batch), CLIENTS_PER_PROCESS)]
    pool = client_pool(len(groups))
    started = time.perf_counter() + CLIENT_START_DELAY_S  # CLOCK_MONOTONIC: one clock for all
    futures = [
        pool.submit(client_group, server.base, server.system, group, max_tokens, started)
        for group in groups
    ]
    pids = [server.process.pid, *child_pids(server.process.pid)]
    figures_before = engine_figures(server)
    cpu_before = [process_cpu_s(pid) for pid in pids]
    streams = [stream for future in futures for stream in future.result()]
    result = Measurement(server.system, len(batch), 0, max(s.end for s in streams) - started)
    cpu_after = [process_cpu_s(pid) for pid in pids]
    spent = [b - a for a, b in zip(cpu_before, cpu_after, strict=True) if a is not None and b]
    if len(spent) == len(pids):
        result.cpu_s, result.front_cpu_s = sum(spent), spent[0]
    figures_after = engine_figures(server)
    if figures_before is not None and figures_after is not None:
        result.event_frames = figures_after[0] - figures_before[0]
        result.event_send_s = figures_after[1] - figures_before[1]
    for stream in streams:
        result.tokens += stream.tokens if stream.error is None else 0
        if stream.error is not None:
            result.errors += 1
            result.error_samples.append(stream.error)
        elif stream.arrivals:
            result.ttft_s.append(stream.arrivals[0] - stream.sent)
            result.itl_s.extend(b - a for a, b in itertools.pairwise(stream.arrivals))
    return result


CLIENTS_PER_PROCESS = 8
CLIENT_START_DELAY_S = 0.5
_client_pools: dict[int, ProcessPoolExecutor] = {}


def client_pool(processes: int) -> ProcessPoolExecutor:
    """Client processes, started once per size (spawned: this process may hold a GPU)."""
    if processes not in _client_pools:
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(processes, mp_context=context)
        # Each process imports this module once, before any timing.
        for future in [pool.submit(time.sleep, 1.0) for _ in range(processes)]:
            future.result()
        _client_pools[processes] = pool
    return _client_pools[processes]


def client_group(
    base: str, system: str, batch: list[Messages], max_tokens: int, start_at: float
) -> list[Stream]:
    """In a client process: stream `batch` at once from threads, starting at `start_at`."""
    with ThreadPoolExecutor(max_workers=len(batch)) as pool:

        def one(messages: Messages) -> Stream:
            time.sleep(max(0.0, start_at - time.perf_counter()))
            return chat(base, system, messages, max_tokens)

        return list(pool.map(one, batch))


# --- multi-turn: cold long history against its next turn --------------------------------------


def run_multi_turn(plan: Plan, history_tokens: int, rounds: int = 3) -> dict[str, Any]:
    """Median over `rounds` distinct conversations of cold TTFT and next-turn TTFT."""
    rows = []
    with Server(OURS, plan) as server:
        server.chat(make_messages("warm-up", 0, plan.prompt_words), 8)
        for r in range(rounds):
            history = make_messages(f"history-{r}", 0, int(history_tokens / 1.1))
            cold = server.chat(history, 16)
            follow = [
                *history,
                {"role": "assistant", "content": cold.text},
                make_messages(f"next-{r}", 0, 20)[-1],
            ]
            warm = server.chat(follow, 16)
            if cold.error or warm.error or not cold.arrivals or not warm.arrivals:
                raise RuntimeError(f"multi-turn request failed: {cold.error or warm.error}")
            rows.append((cold, warm))
            print(
                f"  round {r}: cold {cold.arrivals[0] - cold.sent:.3f} s, next turn "
                f"{warm.arrivals[0] - warm.sent:.3f} s",
                flush=True,
            )
    cold_ttft = sorted(c.arrivals[0] - c.sent for c, _ in rows)[rounds // 2]
    warm_ttft = sorted(w.arrivals[0] - w.sent for _, w in rows)[rounds // 2]
    last_cold, last_warm = rows[-1]
    details = last_warm.usage.get("prompt_tokens_details") or {}
    return {
        "history_prompt_tokens": last_cold.usage.get("prompt_tokens"),
        "next_turn_prompt_tokens": last_warm.usage.get("prompt_tokens"),
        "next_turn_cached_tokens": details.get("cached_tokens"),
        "cold_ttft_s": round(cold_ttft, 4),
        "next_turn_ttft_s": round(warm_ttft, 4),
        "ratio": round(warm_ttft / cold_ttft, 3),
        "rounds": rounds,
    }


# --- report ----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    return {
        "device": str(mx.default_device()),
        "platform": platform.platform(),
        "nproc": os.cpu_count(),
        "cpu": cpu or platform.processor(),
        "mlx": version("mlx"),
        "mlx_lm": version("mlx-lm"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
    }


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(results: list[Measurement]) -> list[dict[str, Any]]:
    print(
        f"\n{'clients':>7}  {'system':<18}{'tok/s':>9}{'TTFT p50':>10}{'p99 s':>8}"
        f"{'ITL p50':>9}{'p99 ms':>8}{'tokens':>8}{'errors':>7}{'CPU ms/tok':>11}"
        f"{'front ms/tok':>13}{'IPC us/step':>12}"
    )
    warm = [r for r in results if r.phase == "warm"]
    for r in sorted(warm, key=lambda m: (m.clients, list(SYSTEM_KEYS.values()).index(m.system))):
        s = r.summary()
        print(
            f"{r.clients:>7}  {r.system:<18}{s['tok_per_s']:>9.1f}{fmt(s['ttft_p50_s']):>10}"
            f"{fmt(s['ttft_p99_s']):>8}{fmt(s['itl_p50_ms'], 1):>9}{fmt(s['itl_p99_ms'], 1):>8}"
            f"{r.tokens:>8}{r.errors:>7}{fmt(s['cpu_ms_per_token'], 1):>11}"
            f"{fmt(s['front_cpu_ms_per_token'], 2):>13}{fmt(s['ipc_us_per_step'], 1):>12}"
        )
    print_cold_start(results)
    return ratios(warm)


def print_cold_start(results: list[Measurement]) -> None:
    """Right after start-up against warm: the first request and the first burst."""
    warm = {(r.system, r.clients): r for r in results if r.phase == "warm"}
    cold = [r for r in results if r.phase != "warm"]
    if not cold:
        return
    print(f"\n{'after start-up':<16}{'system':<18}{'clients':>8}{'wall s':>9}{'tok/s':>9}", end="")
    print(f"{'TTFT p50':>10}{'warm wall s':>12}{'cold/warm':>10}")
    for r in cold:
        twin = warm.get((r.system, r.clients))
        ratio = r.wall_s / twin.wall_s if twin is not None and twin.wall_s else None
        print(
            f"{r.phase:<16}{r.system:<18}{r.clients:>8}{r.wall_s:>9.2f}{r.tokens_per_s:>9.1f}"
            f"{fmt(percentile(r.ttft_s, 50)):>10}"
            f"{fmt(twin.wall_s if twin else None, 2):>12}{fmt(ratio, 2):>10}"
        )


def ratios(results: list[Measurement]) -> list[dict[str, Any]]:
    by_key = {(r.system, r.clients): r.tokens_per_s for r in results}
    rows = []
    print(f"\n{'clients':>7}  {'ours / raw':>11}  {'ours / mlx_lm.server':>21}")
    for n in sorted({r.clients for r in results}):
        ours, raw, theirs = (by_key.get((s, n)) for s in (OURS, RAW, THEIRS))
        row = {
            "clients": n,
            "ours_over_raw": round(ours / raw, 3) if ours and raw else None,
            "ours_over_mlx_lm_server": round(ours / theirs, 3) if ours and theirs else None,
        }
        print(f"{n:>7}  {fmt(row['ours_over_raw']):>11}  {fmt(row['ours_over_mlx_lm_server']):>21}")
        rows.append(row)
    return rows


def plot(results: list[dict[str, Any]], title: str, path: Path) -> None:
    """tok/s against clients from the JSON summaries (matplotlib only here: GPU hosts lack it)."""
    from matplotlib.figure import Figure  # noqa: PLC0415

    results = [r for r in results if r.get("phase", "warm") == "warm"]
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for system, marker in ((OURS, "o"), (THEIRS, "s"), (RAW, "^")):
        points = sorted((r["clients"], r["tok_per_s"]) for r in results if r["system"] == system)
        if points:
            ax.plot(*zip(*points, strict=True), marker=marker, label=system)
    ax.set_xscale("log", base=2)
    ticks = sorted({r["clients"] for r in results})
    ax.set_xticks(ticks, [str(n) for n in ticks])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("output tokens/s (wall time, prefill included)")
    ax.set_title(title, fontsize=9)
    ax.grid(visible=True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=200)
    parser.add_argument(
        "--systems", default="raw,ours,mlx_lm", help='any of raw,ours,mlx_lm; "" for none'
    )
    parser.add_argument("--max-batch-size", type=int, help="for all three (default: each's 32)")
    parser.add_argument("--server-flags", default="", help="extra flags for mlx-server")
    parser.add_argument(
        "--launch", default="", help="run our server under this launcher (mlx.launch ... --)"
    )
    parser.add_argument("--multi-turn", action="store_true")
    parser.add_argument("--history-tokens", type=int, default=4000)
    parser.add_argument("--multi-turn-rounds", type=int, default=3, help="median of this many")
    parser.add_argument("--repeat", type=int, default=1, help="runs per point; the median counts")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--replot", type=Path, help="draw --plot from this --json report; no run")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.replot:
        plot_report(json.loads(args.replot.read_text(encoding="utf-8")), args.plot)
        return
    model_dir = resolve_model(args.model, args.cache_dir, args.quantize)
    plan = Plan(
        model_dir=model_dir,
        clients=tuple(int(n) for n in args.clients.split(",") if n),
        max_tokens=args.max_tokens,
        prompt_words=args.prompt_words,
        max_batch_size=args.max_batch_size,
        repeat=args.repeat,
        server_flags=tuple(shlex.split(args.server_flags)),
        launch=tuple(shlex.split(args.launch)),
        log_dir=Path(tempfile.mkdtemp(prefix="mlx-load-")),
    )
    settings = {
        key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
    }
    report: dict[str, Any] = {"machine": machine(), "settings": settings}
    print(f"{report['machine']}\nmodel {model_dir}; server logs in {plan.log_dir}", flush=True)
    results = run_systems(plan, [SYSTEM_KEYS[s] for s in args.systems.split(",") if s])
    report["results"] = [r.summary() for r in results]
    report["ratios"] = print_table(results) if results else []
    if args.multi_turn:
        report["multi_turn"] = measure_multi_turn(plan, args)
    report["targets"] = check_targets(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    if args.plot and results:
        plot_report(report, args.plot)


def plot_report(report: dict[str, Any], path: Path) -> None:
    settings = report["settings"]
    title = (
        f"{settings['model']}{' q' + str(settings['quantize']) if settings['quantize'] else ''}"
        f" on {report['machine']['device']}, {settings['max_tokens']} tokens, "
        f"{settings['prompt_words']}-word prompts"
    )
    plot(report["results"], title, path)


def measure_multi_turn(plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    multi = run_multi_turn(plan, args.history_tokens, args.multi_turn_rounds)
    print(
        f"\nmulti-turn ({multi['history_prompt_tokens']} prompt tokens): cold TTFT "
        f"{multi['cold_ttft_s']:.3f} s, next turn {multi['next_turn_ttft_s']:.3f} s "
        f"({multi['next_turn_cached_tokens']} cached), ratio {multi['ratio']:.3f}"
    )
    return multi


def check_targets(report: dict[str, Any]) -> list[str]:
    """The engine issue's targets, each printed as met or missed."""
    checks = []
    for row in report["ratios"]:
        n, vs_raw, vs_theirs = row["clients"], row["ours_over_raw"], row["ours_over_mlx_lm_server"]
        if n == 1 and vs_raw is not None:
            checks.append((f"1 stream: ours/raw {vs_raw} >= 0.97", vs_raw >= 0.97))
        if n >= 32 and vs_raw is not None:
            checks.append((f"{n} clients: ours/raw {vs_raw} >= 0.90", vs_raw >= 0.90))
        if n >= 32 and vs_theirs is not None:
            checks.append((f"{n} clients: ours/mlx_lm.server {vs_theirs} >= 2", vs_theirs >= 2))
    errors = sum(r["errors"] for r in report["results"] if r["system"] == OURS)
    checks.append((f"errors of ours: {errors} == 0", errors == 0))
    checks += first_burst_checks(report["results"])
    if "multi_turn" in report:
        ratio = report["multi_turn"]["ratio"]
        checks.append((f"multi-turn TTFT next/cold {ratio} <= 0.15", ratio <= 0.15))
    lines = [f"{'met   ' if ok else 'MISSED'} {text}" for text, ok in checks]
    print("\ntargets:", *lines, sep="\n  ")
    return lines


def first_burst_checks(results: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    """Ours: the first burst after start-up within 20 % of a warm burst of the same size."""
    ours = [r for r in results if r["system"] == OURS]
    burst = next((r for r in ours if r["phase"] == "first burst"), None)
    if burst is None:
        return []
    twin = next(
        (r for r in ours if r["phase"] == "warm" and r["clients"] == burst["clients"]), None
    )
    if twin is None or not twin["wall_s"]:
        return []
    ratio = round(burst["wall_s"] / twin["wall_s"], 2)
    return [(f"first burst of {burst['clients']}: wall cold/warm {ratio} <= 1.2", ratio <= 1.2)]


def run_systems(plan: Plan, systems: list[str]) -> list[Measurement]:
    results: list[Measurement] = []
    for system in systems:
        print(f"{system} ...", flush=True)
        results += run_raw(plan) if system == RAW else run_server(system, plan)
        gc.collect()  # the raw model's memory goes back before a server loads its own
        mx.clear_cache()
    return results


if __name__ == "__main__":
    main()
