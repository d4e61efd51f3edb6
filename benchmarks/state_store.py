"""What the state store costs a request: the writes of a stored response, a rate-limited
request and a session turn, on SQLite (a file: WAL; records synchronous=FULL, counters NORMAL)
and on Redis, next to baselines measured in the same run (SQLite in memory: the same statements
without the disk; json.dumps of the same record: the least any store must do).

    python benchmarks/state_store.py [--requests 400] [--concurrency 16] [--dir DIR]

Redis runs when `redis-server` is installed: the script starts one on a free port in a
temporary directory (no persistence, then `appendonly yes` with `appendfsync everysec`, Redis's
usual durable setting). Each figure is the median and p99 of one request's store calls, awaited
one after another; `conc` is requests per second with `--concurrency` requests in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mlx_engine_server.state.redis import RedisStore
from mlx_engine_server.state.sqlite import SqliteStore
from mlx_engine_server.state.store import RecordKey, StateStore, owner_of

OWNER = owner_of(b"benchmark-key")
ANSWER = "The capital of France is Paris. " * 12  # about 400 characters, 100 tokens


def response_record(response_id: str) -> dict[str, object]:
    """A stored response as responses/stored.py writes it: the response object, ~2 KB."""
    message = {
        "type": "message",
        "id": f"msg_{uuid.uuid4().hex}",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": ANSWER, "annotations": [], "logprobs": []}],
    }
    usage = {"input_tokens": 420, "output_tokens": 100, "total_tokens": 520}
    body = {"id": response_id, "object": "response", "status": "completed", "model": "m"}
    body |= {"output": [message], "usage": usage, "instructions": "Be brief.", "tools": []}
    return {"response": body, "previous_response_id": None}


def input_items() -> list[dict[str, object]]:
    text = [{"type": "input_text", "text": "What is the capital of France? " * 4}]
    return [
        {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "role": "user", "content": text}
        for _ in range(2)
    ]


async def store_response(store: StateStore) -> None:
    response_id = f"resp_{uuid.uuid4().hex}"
    key = RecordKey(OWNER, "response", response_id)
    await store.put(key, response_record(response_id), input_items())


async def rate_limited_request(store: StateStore) -> None:
    await store.count(OWNER, 60, 1, 0)  # admitted
    await store.count(OWNER, 60, 0, 520)  # its tokens, once answered


async def session_turn(store: StateStore) -> None:
    key = RecordKey(OWNER, "session", "bench-session")
    record = await store.get(key) or {"id": "bench-session", "messages": []}
    messages = [*record["messages"][-8:], {"role": "user", "content": "Hi"}]
    await store.put(
        key, {**record, "messages": [*messages, {"role": "assistant", "content": ANSWER}]}
    )


async def json_only(_: StateStore) -> None:
    json.dumps(response_record("resp_x"), separators=(",", ":"))
    json.dumps(input_items(), separators=(",", ":"))


Work = Callable[[StateStore], Awaitable[None]]
WORKS: list[tuple[str, Work]] = [
    ("stored response", store_response),
    ("rate-limited request", rate_limited_request),
    ("session turn", session_turn),
]


async def measure(store: StateStore, work: Work, requests: int, concurrency: int) -> str:
    for _ in range(20):  # warm: connection, pages, statements
        await work(store)
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        await work(store)
        times.append(time.perf_counter() - started)
    times.sort()
    median_us = statistics.median(times) * 1e6
    p99_us = times[int(0.99 * (len(times) - 1))] * 1e6
    started = time.perf_counter()
    for _ in range(requests // concurrency):
        await asyncio.gather(*(work(store) for _ in range(concurrency)))
    per_s = (requests // concurrency) * concurrency / (time.perf_counter() - started)
    return f"{median_us:9.0f} {p99_us:9.0f} {per_s:9.0f}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def redis_server(directory: Path, appendonly: bool) -> Iterator[str | None]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        yield None
        return
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)]
    command += ["--save", "", "--appendonly", "yes" if appendonly else "no"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603 - our own command line
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


async def run_backend(name: str, make: Callable[[], StateStore], args: argparse.Namespace) -> None:
    store = make()
    try:
        for label, work in WORKS:
            figures = await measure(store, work, args.requests, args.concurrency)
            print(f"{name:<28} {label:<22} {figures}")
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--dir", type=Path, default=None, help="where the SQLite file goes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        work_dir = args.dir or Path(temporary)
        print(f"{'store':<28} {'per request':<22} {'p50 µs':>9} {'p99 µs':>9} {'conc/s':>9}")
        print(f"{'baseline: json.dumps only':<28} {'stored response':<22} ", end="")
        print(asyncio.run(measure(SqliteStore(None), json_only, args.requests, args.concurrency)))
        asyncio.run(run_backend("baseline: SQLite in memory", lambda: SqliteStore(None), args))
        path = work_dir / f"bench-{uuid.uuid4().hex}.sqlite3"
        asyncio.run(run_backend("SQLite file (WAL)", lambda: SqliteStore(path), args))
        for appendonly in (False, True):
            with redis_server(Path(temporary), appendonly) as url:
                if url is None:
                    print("redis-server is not installed: no Redis figures")
                    break
                label = "Redis, appendonly everysec" if appendonly else "Redis, no persistence"
                asyncio.run(run_backend(label, lambda url=url: RedisStore(url), args))


if __name__ == "__main__":
    main()
