"""The engine client, the HTTP side's only door, against both transports: the engine in a thread
and the engine in a process of its own. The same tests, no HTTP: admission, cancellation,
drain, n-choice requests, reports; and the same greedy text from both."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mlx_engine_server.engine import (
    EngineClient,
    EngineOptions,
    Failed,
    Finished,
    Generation,
    SamplingParams,
    TextDelta,
)
from mlx_engine_server.engine.device import KERNEL_CACHE_ENV, keep_kernels_in
from mlx_engine_server.engine.local import local_client
from mlx_engine_server.engine.messages import EngineSpec
from mlx_engine_server.engine.process import process_client
from mlx_engine_server.errors import OverloadedError, ServiceUnavailableError
from mlx_engine_server.models.loader import ModelSource, load_model

from ..model_factory import build_tiny_llama

# Two rows in the batch and one waiting: a fourth sequence is a 429.
SMALL = EngineOptions(max_batch_size=2, max_queue=1, prefill_step_size=64)
NO_GRACE = EngineOptions(max_batch_size=2, max_queue=1, prefill_step_size=64, shutdown_grace_s=0)
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
BUSY = SamplingParams(max_tokens=4000, temperature=0.0, ignore_eos=True)  # until cancelled
PROMPT = [1, 2, 3, 4, 5]
TRANSPORTS = ["thread", "process"]


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm_dir: Path) -> Path:
    dest = tmp_path_factory.mktemp("client") / "long-llama"
    return build_tiny_llama(dest, smollm_dir, context_window=8192)


def make_client(kind: str, model_dir: Path, options: EngineOptions) -> EngineClient:
    if kind == "thread":
        source = ModelSource(model_path=str(model_dir))
        return local_client(lambda: load_model(source), options)
    spec = EngineSpec(str(model_dir), None, None, str(model_dir.parent / "cache"), False, options)
    return process_client(spec, "warning", "text")


@pytest.fixture(scope="module", params=TRANSPORTS)
def client(request: pytest.FixtureRequest, long_model_dir: Path) -> Iterator[EngineClient]:
    engine = make_client(request.param, long_model_dir, SMALL)
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture(params=TRANSPORTS)
def fresh_client(request: pytest.FixtureRequest, long_model_dir: Path) -> Iterator[EngineClient]:
    """A client to spoil: draining is for good."""
    engine = make_client(request.param, long_model_dir, NO_GRACE)
    engine.start()
    yield engine
    engine.stop()


async def read_all(generation: Generation) -> list[tuple[int, TextDelta | Finished | Failed]]:
    return [item async for item in generation.events()]


async def text_of(engine: EngineClient, params: SamplingParams) -> str:
    generation = engine.generate([(PROMPT, params)])
    events = await read_all(generation)
    assert isinstance(events[-1][1], Finished), events[-1]
    return "".join(event.text for _, event in events if isinstance(event, TextDelta))


def wait_until(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def idle(engine: EngineClient) -> bool:
    report = engine.report_now()
    return report is not None and report.stats.requests_active + report.stats.requests_queued == 0


def test_both_transports_give_the_same_greedy_text(long_model_dir: Path) -> None:
    texts = []
    for kind in TRANSPORTS:
        engine = make_client(kind, long_model_dir, SMALL)
        engine.start()
        try:
            texts.append(asyncio.run(text_of(engine, GREEDY)))
        finally:
            engine.stop()
    assert texts[0], "the greedy text is empty"
    assert texts[0] == texts[1]


def test_the_model_facts_come_with_ready(
    request: pytest.FixtureRequest, client: EngineClient, long_model_dir: Path
) -> None:
    model = client.model
    assert model.context_window == 8192
    assert model.resolved_path == str(long_model_dir)
    assert model.kind == "text"
    assert client.tokenizer.encode("hello")  # the front's own tokenizer works
    in_a_thread = request.node.callspec.params["client"] == "thread"
    assert (model.engine_pid == os.getpid()) == in_a_thread


def test_a_full_engine_refuses_at_once_and_cancel_frees_the_slots(client: EngineClient) -> None:
    async def scenario() -> None:
        busy = [client.generate([(PROMPT, BUSY)]) for _ in range(client.capacity)]
        with pytest.raises(OverloadedError) as refused:
            client.generate([(PROMPT, GREEDY)])
        assert refused.value.retry_after_s is not None
        for generation in busy[:2]:
            assert isinstance(await generation.admission(), dict)
        for generation in busy:
            generation.cancel()
        for generation in busy:
            (*_, (_, last)) = await read_all(generation)
            assert isinstance(last, Failed)
            assert last.message == "cancelled"
        assert await text_of(client, GREEDY)  # the slots are free again

    asyncio.run(scenario())


def test_n_choices_are_admitted_all_or_none(client: EngineClient) -> None:
    async def scenario() -> None:
        with pytest.raises(OverloadedError):
            client.generate([(PROMPT, GREEDY)] * (client.capacity + 1))
        generation = client.generate([(PROMPT, GREEDY)] * client.capacity)
        events = await read_all(generation)
        finished = {index for index, event in events if isinstance(event, Finished)}
        assert finished == set(range(client.capacity))
        texts = {
            index: "".join(e.text for i, e in events if i == index and isinstance(e, TextDelta))
            for index in finished
        }
        assert len(set(texts.values())) == 1  # greedy: every choice the same

    asyncio.run(scenario())


def test_reports_cross_the_boundary(client: EngineClient) -> None:
    before = client.report_now()
    assert before is not None
    asyncio.run(text_of(client, GREEDY))
    wait_until(lambda: idle(client))
    after = client.report_now()
    assert after is not None
    assert after.stats.requests_total == before.stats.requests_total + 1
    assert after.stats.completion_tokens_total >= before.stats.completion_tokens_total + 12
    assert after.prefix_cache is not None
    assert after.prefix_cache.hits + after.prefix_cache.misses > 0
    assert after.memory_budget is not None
    assert after.memory_budget["weights_bytes"] > 0
    assert "active_bytes" in after.device_memory


def test_draining_refuses_new_work_and_ends_running_work(fresh_client: EngineClient) -> None:
    async def scenario() -> None:
        running = fresh_client.generate([(PROMPT, BUSY)])
        assert isinstance(await running.admission(), dict)
        fresh_client.drain()
        with pytest.raises(ServiceUnavailableError):
            fresh_client.generate([(PROMPT, GREEDY)])
        (*_, (_, last)) = await read_all(running)  # the grace period (0 s here) passes
        assert isinstance(last, Failed)
        assert last.kind == "shutdown"

    asyncio.run(scenario())


def test_a_warm_up_leaves_no_trace_but_its_time(long_model_dir: Path) -> None:
    """On CUDA the engine warms up by itself (kernels compile at first use); here it is asked."""
    options = EngineOptions(max_batch_size=8, warmup=True)
    engine = make_client("thread", long_model_dir, options)
    engine.start()
    try:
        assert engine.model.warmup_s > 0
        report = engine.report_now()
        assert report is not None
        assert report.stats.requests_total == 0
        assert report.stats.completion_tokens_total == 0
        assert report.prefix_cache is not None
        assert report.prefix_cache.entries == 0
        assert report.prefix_cache.hits + report.prefix_cache.misses == 0
        assert asyncio.run(text_of(engine, GREEDY))
    finally:
        engine.stop()


def test_no_warm_up_on_a_cpu_unless_asked(client: EngineClient) -> None:
    assert client.model.warmup_s == 0.0


def test_compiled_kernels_are_kept_under_the_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KERNEL_CACHE_ENV, raising=False)
    keep_kernels_in(tmp_path)
    kept = Path(os.environ[KERNEL_CACHE_ENV])
    assert kept.is_dir()
    assert kept.is_relative_to(tmp_path / "cuda-kernels")
    monkeypatch.setenv(KERNEL_CACHE_ENV, "/operator/choice")
    keep_kernels_in(tmp_path)
    assert os.environ[KERNEL_CACHE_ENV] == "/operator/choice"
