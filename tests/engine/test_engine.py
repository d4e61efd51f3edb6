"""The engine under real concurrency: batching, backpressure, cancellation, deadlines."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from mlx_engine_server.engine import (
    EngineOptions,
    Event,
    Finished,
    SamplingParams,
    TextDelta,
)

from ..conftest import LiveServer, run_live_server, start_engine
from ..model_factory import build_tiny_llama

LONG_CONTEXT_WINDOW = 8192
# A random model could end early on an end-of-sequence token: ignore_eos keeps it busy.
BUSY_FOR_SECONDS = {
    "prompt": "A long tale",
    "max_tokens": LONG_CONTEXT_WINDOW - 100,
    "temperature": 0,
    "ignore_eos": True,
}
PROMPTS = [f"Story number {index}: once upon a time" for index in range(16)]


def complete(base_url: str, prompt: str, **fields: Any) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, **fields}
    response = httpx.post(f"{base_url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def texts_alone_and_together(base_url: str, **fields: Any) -> tuple[list[str], list[str]]:
    alone = [complete(base_url, p, **fields)["choices"][0]["text"] for p in PROMPTS]
    with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
        results = list(pool.map(lambda p: complete(base_url, p, **fields), PROMPTS))
    return alone, [r["choices"][0]["text"] for r in results]


def test_greedy_answers_are_the_same_alone_and_batched(tiny_server: LiveServer) -> None:
    before = tiny_server.engine.report_now().stats.requests_total
    alone, together = texts_alone_and_together(tiny_server.base_url)
    assert together == alone
    assert tiny_server.engine.report_now().stats.requests_total == before + 2 * len(PROMPTS)


def test_seeded_sampling_is_the_same_alone_and_batched(tiny_server: LiveServer) -> None:
    alone, together = texts_alone_and_together(tiny_server.base_url, temperature=1.0, seed=11)
    assert together == alone


def wait_until_idle(server: LiveServer, timeout_s: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        status: dict[str, Any] = httpx.get(f"{server.base_url}/v1/mlx/status").json()
        engine = status["engine"]
        if engine["requests_active"] == 0 and engine["requests_queued"] == 0:
            return status
        assert time.monotonic() < deadline, f"still busy: {engine}"
        time.sleep(0.05)


def open_and_drop_stream(base_url: str) -> None:
    body = {"prompt": "Tell me everything", "max_tokens": 200, "stream": True}
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", f"{base_url}/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                return  # leave with the stream still running


def test_dropped_streams_leave_the_batch(tiny_server: LiveServer) -> None:
    with ThreadPoolExecutor(max_workers=20) as pool:
        list(pool.map(lambda _: open_and_drop_stream(tiny_server.base_url), range(20)))
    wait_until_idle(tiny_server)
    started = time.monotonic()
    complete(tiny_server.base_url, "Still there?", max_tokens=2)
    assert time.monotonic() - started < 10


@pytest.fixture(scope="module")
def long_context_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm_dir: Path) -> Path:
    """A tiny llama with room for thousands of tokens: requests that stay busy for seconds."""
    dest = tmp_path_factory.mktemp("long-llama") / "long-llama"
    return build_tiny_llama(dest, smollm_dir, context_window=LONG_CONTEXT_WINDOW)


@pytest.fixture
def one_slot_server(long_context_model_dir: Path) -> Iterator[LiveServer]:
    options = EngineOptions(max_batch_size=1, max_queue=0)
    live = run_live_server(start_engine(long_context_model_dir, options))
    yield live
    live.stop()


def test_full_queue_answers_429_at_once(one_slot_server: LiveServer) -> None:
    url = f"{one_slot_server.base_url}/v1/completions"
    body = {**BUSY_FOR_SECONDS, "stream": True}
    with (
        httpx.Client(timeout=30) as http,
        http.stream("POST", url, json=body) as first,
    ):
        assert first.status_code == 200
        lines = first.iter_lines()
        first_line = next(lines)
        second = http.post(url, json={"prompt": "Me too", "max_tokens": 2})
        if second.status_code != 429:  # say why the first request no longer holds its slot
            later = [next(lines, "")[:300] for _ in range(3)]
            pytest.fail(f"{second.text}; first stream: {first_line[:300]} {later}")
        assert second.headers["retry-after"].isdigit()
        assert second.json()["error"]["type"] == "rate_limit_error"
    wait_until_idle(one_slot_server)
    assert complete(one_slot_server.base_url, "Now?", max_tokens=2)["choices"]


@pytest.fixture
def impatient_server(long_context_model_dir: Path) -> Iterator[LiveServer]:
    options = EngineOptions(request_timeout_s=0.3)
    live = run_live_server(start_engine(long_context_model_dir, options))
    yield live
    live.stop()


def test_request_past_its_deadline_ends_with_an_error(impatient_server: LiveServer) -> None:
    url = f"{impatient_server.base_url}/v1/chat/completions"
    messages = [{"role": "user", "content": "Go on forever"}]
    response = httpx.post(url, json={"messages": messages, "ignore_eos": True}, timeout=30)
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "timeout"
    wait_until_idle(impatient_server)


def test_non_streaming_client_that_hangs_up_frees_its_slot(one_slot_server: LiveServer) -> None:
    url = f"{one_slot_server.base_url}/v1/completions"
    body = BUSY_FOR_SECONDS
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=body, timeout=0.5)
    status = wait_until_idle(one_slot_server, timeout_s=5)
    assert status["counters"]["completion_tokens_total"] < LONG_CONTEXT_WINDOW - 100
    assert complete(one_slot_server.base_url, "Next!", max_tokens=2)["choices"]


@pytest.fixture
def small_queue_server(tiny_model_dir: Path) -> Iterator[LiveServer]:
    live = run_live_server(
        start_engine(tiny_model_dir, EngineOptions(max_batch_size=8, max_queue=16))
    )
    yield live
    live.stop()


def test_256_clients_at_once_are_each_served_or_told_429(small_queue_server: LiveServer) -> None:
    url = f"{small_queue_server.base_url}/v1/completions"

    def one(index: int) -> int:
        body = {"prompt": f"Client {index}", "max_tokens": 16, "ignore_eos": True}
        response = httpx.post(url, json=body, timeout=120)
        if response.status_code == 429:
            assert response.headers["retry-after"].isdigit()
            assert response.json()["error"]["code"] == "queue_full"
        else:
            assert response.json()["usage"]["completion_tokens"] == 16
        return response.status_code

    with ThreadPoolExecutor(max_workers=256) as pool:
        statuses = list(pool.map(one, range(256)))
    assert set(statuses) <= {200, 429}
    assert statuses.count(200) >= 8 + 16
    assert statuses.count(429) > 0
    wait_until_idle(small_queue_server)


def test_text_waiting_for_a_late_reader_comes_as_one_delta(tiny_model_dir: Path) -> None:
    engine = start_engine(tiny_model_dir)
    try:
        events = asyncio.run(read_once_finished(engine, max_tokens=12))
    finally:
        engine.stop()
    deltas = [event for event in events if isinstance(event, TextDelta)]
    assert len(deltas) == 1
    assert len(deltas[0].token_ids) == 12
    assert isinstance(events[-1], Finished)
    assert events[-1].usage.completion_tokens == 12


async def read_once_finished(engine: Any, max_tokens: int) -> list[Event]:
    """Start a generation, read nothing until the worker has posted its end, then read it all."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    generation = engine.generate([([1, 2, 3, 4], params)])
    await generation.admission()
    await asyncio.to_thread(wait_until_engine_idle, engine)
    await asyncio.sleep(0.1)  # the worker's last posts reach this loop
    return [event async for _, event in generation.events()]


def wait_until_engine_idle(engine: Any, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while engine.report_now().stats.requests_active and time.monotonic() < deadline:
        time.sleep(0.05)
