"""Memory-aware admission: requests start only when their KV cache fits (a draft model's too);
never an OOM abort."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from mlx_engine_server.engine import EngineClient, EngineOptions
from mlx_engine_server.engine.local import local_client
from mlx_engine_server.http.app import create_app
from mlx_engine_server.models.draft import load_with_draft
from mlx_engine_server.models.loader import ModelSource

from ..conftest import start_engine
from ..model_factory import build_tiny_llama

# tiny llama: 2 layers x (keys + values) x 2 KV heads x 16 dims x 4 bytes (float32 on CPU)
TINY_KV_BYTES_PER_TOKEN = 2 * 2 * 2 * 16 * 4
LONG_REQUEST_TOKENS = 1500


@pytest.fixture(scope="module")
def roomy_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm_dir: Path) -> Path:
    dest = tmp_path_factory.mktemp("roomy") / "roomy-llama"
    return build_tiny_llama(dest, smollm_dir, context_window=4096)


# A small prefill workspace keeps run-to-run noise in its measurement far below one request's KV.
SMALL_PREFILL = {"max_batch_size": 2, "prefill_step_size": 16, "prefix_cache_bytes": 0}


@pytest.fixture(scope="module")
def measured(roomy_model_dir: Path) -> dict[str, int]:
    engine = start_engine(roomy_model_dir, EngineOptions(**SMALL_PREFILL))
    try:
        report = engine.report_now()
        stats = report.memory_budget if report is not None else None
    finally:
        engine.stop()
    assert stats is not None
    return stats


def long_request_bytes(measured: dict[str, int]) -> int:
    """What the server reserves for one long request with a one-token prompt."""
    return (LONG_REQUEST_TOKENS + 1) * measured["kv_bytes_per_token"]


def test_kv_cost_is_measured_from_the_model(measured: dict[str, int]) -> None:
    assert measured["kv_bytes_per_token"] == TINY_KV_BYTES_PER_TOKEN
    assert measured["weights_bytes"] > 49152 * 64 * 4  # the embedding alone, float32
    assert measured["budget_bytes"] > measured["weights_bytes"]


def room_for_one_and_a_half(stats: dict[str, int]) -> int:
    baseline = stats["weights_bytes"] + stats["prefill_workspace_bytes"]
    return baseline + int(long_request_bytes(stats) * 1.5)


def fits_one_not_two(stats: dict[str, int]) -> bool:
    room = stats["budget_bytes"] - stats["weights_bytes"] - stats["prefill_workspace_bytes"]
    return long_request_bytes(stats) <= room < 2 * long_request_bytes(stats)


@pytest.fixture
def one_long_request_fits(
    roomy_model_dir: Path, measured: dict[str, int]
) -> Iterator[tuple[TestClient, EngineClient]]:
    """Room for one long request and not two, by the budgeted engine's own measurement: peak
    memory is process-wide, so MLX work elsewhere in the test process can move another engine's
    figures by more than half a request's KV."""
    stats = measured
    for _ in range(3):
        options = EngineOptions(memory_budget_bytes=room_for_one_and_a_half(stats), **SMALL_PREFILL)
        engine = start_engine(roomy_model_dir, options)
        report = engine.report_now()
        assert report is not None
        assert report.memory_budget is not None
        if fits_one_not_two(report.memory_budget):
            break
        stats = report.memory_budget
        engine.stop()
    else:
        pytest.fail(f"no budget fitted one long request and not two: {stats}")
    with TestClient(create_app(engine)) as client:
        yield client, engine


def long_body(prompt: str) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": LONG_REQUEST_TOKENS, "ignore_eos": True}


def test_a_request_that_can_never_fit_is_a_503_naming_the_problem(
    one_long_request_fits: tuple[TestClient, EngineClient],
) -> None:
    client, _ = one_long_request_fits
    response = client.post("/v1/completions", json={**long_body("Hi"), "max_tokens": 3000})
    assert response.status_code == 503, response.text[:300]
    error = response.json()["error"]
    assert error["code"] == "insufficient_memory"
    assert "max_tokens" in error["message"]
    small = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
    assert small.status_code == 200


def test_a_second_request_waits_until_the_first_frees_its_memory(
    one_long_request_fits: tuple[TestClient, EngineClient],
) -> None:
    client, engine = one_long_request_fits
    results: dict[str, int] = {}

    def send(name: str) -> None:
        response = client.post("/v1/completions", json=long_body(name))
        results[name] = response.json()["usage"]["completion_tokens"]

    first = threading.Thread(target=send, args=("first",))
    first.start()
    deadline = time.monotonic() + 30
    while engine.report_now().stats.requests_active == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    second = threading.Thread(target=send, args=("second",))
    second.start()
    time.sleep(0.3)
    stats = engine.report_now().stats
    assert (stats.requests_active, stats.requests_queued) == (1, 1)
    first.join(60)
    second.join(60)
    assert results == {"first": LONG_REQUEST_TOKENS, "second": LONG_REQUEST_TOKENS}
    report = engine.report_now()
    memory = report.memory_budget if report is not None else None
    assert memory is not None
    assert memory["reserved_bytes"] == 0


def start_self_drafting(model_dir: Path, budget_bytes: int | None) -> EngineClient:
    """The model as its own draft: the draft's weights and KV cache are as large as its own."""
    options = EngineOptions(
        speculative="draft",
        num_draft_tokens=2,
        draft_model_path=str(model_dir),
        memory_budget_bytes=budget_bytes,
        **SMALL_PREFILL,
    )
    source = ModelSource(model_path=str(model_dir))
    engine = local_client(lambda: load_with_draft(source, str(model_dir)), options)
    engine.start()
    return engine


def budget_of(engine: EngineClient) -> dict[str, int]:
    report = engine.report_now()
    assert report is not None
    assert report.memory_budget is not None
    return report.memory_budget


def main_request_bytes(stats: dict[str, int]) -> int:
    """One long request's KV in the main model alone."""
    main_kv = stats["kv_bytes_per_token"] - stats["draft_kv_bytes_per_token"]
    return (LONG_REQUEST_TOKENS + 1) * main_kv


def fits_one_drafting_row_not_two(stats: dict[str, int]) -> bool:
    room = stats["budget_bytes"] - stats["weights_bytes"] - stats["prefill_workspace_bytes"]
    with_draft = long_request_bytes(stats)
    return 2 * main_request_bytes(stats) <= room and with_draft <= room < 2 * with_draft


@pytest.fixture
def one_drafting_row_fits(roomy_model_dir: Path) -> Iterator[tuple[TestClient, EngineClient]]:
    """Room for two long requests' main KV caches but for one only with their draft caches."""
    engine = start_self_drafting(roomy_model_dir, None)
    stats = budget_of(engine)
    engine.stop()
    for _ in range(3):
        room = 3 * main_request_bytes(stats)
        budget = stats["weights_bytes"] + stats["prefill_workspace_bytes"] + room
        engine = start_self_drafting(roomy_model_dir, budget)
        if fits_one_drafting_row_not_two(budget_of(engine)):
            break
        stats = budget_of(engine)
        engine.stop()
    else:
        pytest.fail(f"no budget fitted one drafting request and not two: {stats}")
    with TestClient(create_app(engine)) as client:
        yield client, engine


def test_a_draft_models_weights_and_kv_cache_count_for_admission(
    one_drafting_row_fits: tuple[TestClient, EngineClient], measured: dict[str, int]
) -> None:
    client, engine = one_drafting_row_fits
    stats = budget_of(engine)
    assert stats["draft_kv_bytes_per_token"] == TINY_KV_BYTES_PER_TOKEN
    assert stats["kv_bytes_per_token"] == 2 * TINY_KV_BYTES_PER_TOKEN
    assert stats["draft_weights_bytes"] > 49152 * 64 * 4  # its embedding alone, float32
    assert stats["weights_bytes"] > measured["weights_bytes"] + 49152 * 64 * 4
    test_a_second_request_waits_until_the_first_frees_its_memory((client, engine))
