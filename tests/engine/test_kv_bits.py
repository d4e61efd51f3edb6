"""--kv-bits over real HTTP: quantized KV caches inside the batch and in the prefix cache,
alone and under speculative decoding, and admission that counts the smaller bytes."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from mlx_engine_server.engine import EngineOptions, rewind
from mlx_engine_server.engine.local import local_client
from mlx_engine_server.engine.quantized_kv import empty_row_cache
from mlx_engine_server.models.loader import ModelSource, load_model

from ..cli.test_cli import MLX_SERVER, ServerProcess, clean_env, free_port, wait_until_healthy
from ..conftest import LiveServer, run_live_server, start_engine
from ..model_factory import build_tiny_llama
from .test_speculative import check_uneven_rejections

# Two heads of 32 dimensions: a group of 32 values shares one scale and bias.
KV8 = EngineOptions(kv_bits=8, kv_group_size=32)
PROMPTS = ["red one two red one two red", "A long tale begins", "x y z", "1 2 3 4"]
FLOAT32_BYTES = 4
BFLOAT16_BYTES = 2


@pytest.fixture(scope="module")
def wide_heads_model(tmp_path_factory: pytest.TempPathFactory, smollm_dir: Path) -> Path:
    dest = tmp_path_factory.mktemp("wide-heads") / "tiny-llama"
    return build_tiny_llama(dest, smollm_dir, context_window=256, attention_heads=2)


@contextmanager
def serve(model: Path, options: EngineOptions, dtype: str = "auto") -> Iterator[LiveServer]:
    if dtype == "auto":
        engine = start_engine(model, options)
    else:
        source = ModelSource(model_path=str(model), dtype=dtype)
        engine = local_client(lambda: load_model(source), options)
        engine.start()
    live = run_live_server(engine)
    try:
        yield live
    finally:
        live.stop()
        live.engine.stop()


@pytest.fixture(scope="module")
def plain_server(wide_heads_model: Path) -> Iterator[LiveServer]:
    with serve(wide_heads_model, EngineOptions()) as live:
        yield live


@pytest.fixture(scope="module")
def kv8_server(wide_heads_model: Path) -> Iterator[LiveServer]:
    with serve(wide_heads_model, KV8) as live:
        yield live


def complete(server: LiveServer, prompt: str) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    response = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def batched_texts(server: LiveServer) -> list[str]:
    with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
        results = list(pool.map(lambda p: complete(server, p), PROMPTS))
    return [result["choices"][0]["text"] for result in results]


def status(server: LiveServer) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{server.base_url}/v1/mlx/status").json()
    return body


def test_batched_rows_with_a_quantized_cache_answer_as_they_do_alone(
    kv8_server: LiveServer,
) -> None:
    together = batched_texts(kv8_server)
    alone = [complete(kv8_server, prompt)["choices"][0]["text"] for prompt in PROMPTS]
    assert together == alone
    assert all(len(text) > 0 for text in together)


def test_prefix_cache_keeps_quantized_entries_and_reuses_them(kv8_server: LiveServer) -> None:
    prompt = "reuse this prompt " * 6
    first = complete(kv8_server, prompt)
    second = complete(kv8_server, prompt)
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert status(kv8_server)["prefix_cache"]["entries"] > 0


def test_admission_counts_the_quantized_bytes(
    kv8_server: LiveServer, plain_server: LiveServer
) -> None:
    quantized = status(kv8_server)["memory_budget"]["kv_bytes_per_token"]
    plain = status(plain_server)["memory_budget"]["kv_bytes_per_token"]
    # 8 bits a value plus a float32 scale and bias per 32 values, against float32 values.
    expected = (1 + 2 * FLOAT32_BYTES / 32) / FLOAT32_BYTES
    assert quantized / plain == pytest.approx(expected, rel=0.02)
    assert status(kv8_server)["engine"]["kv_bits"] == 8


def test_speculation_over_a_quantized_cache_keeps_greedy_answers(
    wide_heads_model: Path, kv8_server: LiveServer
) -> None:
    options = EngineOptions(
        kv_bits=8, kv_group_size=32, speculative="ngram", num_draft_tokens=4, ngram_size=2
    )
    with serve(wide_heads_model, options) as live:
        assert batched_texts(live) == batched_texts(kv8_server)
        assert status(live)["speculative"]["accepted_tokens_total"] > 0


@pytest.mark.parametrize("few_rows_share", [0.0, 1.0], ids=["roll-batch", "move-rows"])
def test_uneven_rejections_over_a_quantized_cache(
    wide_heads_model: Path, few_rows_share: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The per-row rewind moves quantized triples as it moves plain keys and values."""
    monkeypatch.setattr(rewind, "FEW_ROWS_SHARE", few_rows_share)
    check_uneven_rejections(
        wide_heads_model, lambda model: empty_row_cache(len(model.layers), group_size=32, bits=8)
    )


def test_a_16_bit_model_and_its_quantized_cache_are_counted_at_their_own_sizes(
    wide_heads_model: Path, plain_server: LiveServer
) -> None:
    """--dtype bfloat16 on the CPU: admission measures 2-byte keys and values, and the quantized
    cache's scales and biases in bfloat16 too (not float32 as beside a float32 model)."""
    float32 = status(plain_server)["memory_budget"]["kv_bytes_per_token"]
    with serve(wide_heads_model, EngineOptions(), dtype="bfloat16") as live:
        bf16 = status(live)["memory_budget"]["kv_bytes_per_token"]
        answer = complete(live, PROMPTS[0])["choices"][0]["text"]
    with serve(wide_heads_model, KV8, dtype="bfloat16") as live:
        quantized = status(live)["memory_budget"]["kv_bytes_per_token"]
    assert bf16 / float32 == pytest.approx(BFLOAT16_BYTES / FLOAT32_BYTES, rel=0.02)
    # 8 bits a value plus a bfloat16 scale and bias per 32 values, against bfloat16 values.
    expected = (1 + 2 * BFLOAT16_BYTES / 32) / BFLOAT16_BYTES
    assert quantized / bf16 == pytest.approx(expected, rel=0.02)
    assert len(answer) > 0


def test_the_dtype_flag_reaches_the_engine_process(
    wide_heads_model: Path, plain_server: LiveServer, tmp_path: Path
) -> None:
    """`mlx-server --dtype bfloat16 --kv-bits 8`: the engine process computes in bfloat16, so its
    quantized cache has bfloat16 scales and biases, against the float32 default's cache."""
    port = free_port()
    args = [str(wide_heads_model), "--port", str(port), "--cache-dir", str(tmp_path / "cache")]
    args += ["--dtype", "bfloat16", "--kv-bits", "8", "--kv-group-size", "32"]
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([MLX_SERVER, *args], env=clean_env(), stdout=log, stderr=log)
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_until_healthy(server)
        reply = httpx.get(f"{server.base_url}/v1/mlx/status", timeout=10).json()
    finally:
        process.kill()
        process.wait(timeout=10)
    assert reply["model"]["dtype"] == "bfloat16"
    assert status(plain_server)["model"]["dtype"] == "float32"  # auto, on the CPU
    float32 = status(plain_server)["memory_budget"]["kv_bytes_per_token"]
    expected = (1 + 2 * BFLOAT16_BYTES / 32) / FLOAT32_BYTES
    assert reply["memory_budget"]["kv_bytes_per_token"] / float32 == pytest.approx(
        expected, rel=0.02
    )
