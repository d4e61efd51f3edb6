"""One big request cannot freeze the others: tokenizing and template rendering run off the event
loop (/health answers meanwhile), and text that surely overflows the window is refused before
any of that work."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from mlx_engine_server.engine import EngineClient
from mlx_engine_server.pipeline.front_work import longest_token_chars

from ..conftest import LiveServer, run_live_server, start_engine
from ..model_factory import build_tiny_llama

LINE = "The quick brown fox jumps over the lazy dog, again and again. " * 64  # ~4 KB


@pytest.fixture(scope="module")
def wide_server(tmp_path_factory: pytest.TempPathFactory, smollm_dir: Path) -> Iterator[LiveServer]:
    """A context window of a million tokens: megabytes of text are worth tokenizing."""
    model = build_tiny_llama(
        tmp_path_factory.mktemp("wide") / "wide", smollm_dir, context_window=1 << 20
    )
    live = run_live_server(start_engine(model))
    yield live
    live.stop()


def slowest_health_while(base_url: str, send: Any) -> tuple[float, float, int]:
    """(the big request's duration, the slowest /health meanwhile, /health answers meanwhile)."""
    done = threading.Event()
    took: list[float] = []

    def big() -> None:
        started = time.perf_counter()
        send()
        took.append(time.perf_counter() - started)
        done.set()

    thread = threading.Thread(target=big)
    thread.start()
    slowest, answered = 0.0, 0
    with httpx.Client(timeout=120) as client:
        while not done.is_set():
            started = time.perf_counter()
            assert client.get(f"{base_url}/health").status_code == 200
            slowest = max(slowest, time.perf_counter() - started)
            answered += 0 if done.is_set() else 1
            time.sleep(0.01)
    thread.join()
    return took[0], slowest, answered


def test_health_answers_while_megabytes_are_tokenized(wide_server: LiveServer) -> None:
    prompt = LINE * 200  # 0.8 MB
    answer: dict[str, Any] = {}

    def send() -> None:
        response = httpx.post(
            f"{wide_server.base_url}/tokenize", json={"prompt": prompt}, timeout=300
        )
        answer.update(response.json())

    duration_s, slowest_s, answered = slowest_health_while(wide_server.base_url, send)
    assert answer["count"] > len(prompt) // 8
    assert answered >= 2, f"/health waited for the whole {duration_s:.2f} s tokenization"
    assert slowest_s < duration_s / 2, (slowest_s, duration_s)


def test_health_answers_while_a_long_chat_is_rendered(wide_server: LiveServer) -> None:
    messages = [{"role": "user", "content": LINE} for _ in range(200)]
    counted: dict[str, Any] = {}

    def send() -> None:
        body = {"model": "m", "max_tokens": 1, "messages": messages}
        response = httpx.post(
            f"{wide_server.base_url}/v1/messages/count_tokens", json=body, timeout=300
        )
        counted.update(response.json())

    duration_s, slowest_s, answered = slowest_health_while(wide_server.base_url, send)
    assert counted["input_tokens"] > 200 * len(LINE) // 8
    assert answered >= 2, f"/health waited for the whole {duration_s:.2f} s render"
    assert slowest_s < duration_s / 2, (slowest_s, duration_s)


# --- text that can never fit is refused before it is rendered or tokenized ----------------------


def test_a_chat_of_megabytes_over_the_window_is_refused_from_its_length(
    tiny_server: LiveServer,
) -> None:
    messages = [{"role": "user", "content": LINE} for _ in range(2048)]  # 8 MB
    response = httpx.post(
        f"{tiny_server.base_url}/v1/chat/completions", json={"messages": messages}, timeout=120
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "messages"
    assert "at least" in error["message"]  # counted from characters: never rendered


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/tokenize", {"prompt": LINE * 2500}, "prompt"),
        ("/tokenize", {"messages": [{"role": "user", "content": LINE * 2500}]}, "messages"),
        ("/v1/completions", {"prompt": LINE * 2500}, "prompt"),
        ("/v1/completions", {"prompt": ["Hi", LINE * 2500]}, "prompt[1]"),
    ],
)
def test_megabytes_over_the_window_are_refused_everywhere(
    tiny_server: LiveServer, path: str, body: dict[str, Any], param: str
) -> None:
    response = httpx.post(f"{tiny_server.base_url}{path}", json=body, timeout=120)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", param)
    assert "at least" in error["message"]


@pytest.mark.parametrize(
    "text",
    [
        " " * 5000,
        "=" * 5000,
        "\n" * 5000,
        "a" * 5000,
        LINE,
        "é" * 3000,
        "e\u0301" * 2000,  # decomposed accents a normalizer may compose
        "日本語のテキスト" * 500,
        "🙂" * 2000,
        "<|im_start|>" * 300,
    ],
)
def test_the_character_bound_never_exceeds_the_real_token_count(
    tiny_server: LiveServer, text: str
) -> None:
    """The early refusal can only refuse what would not fit: tokens >= characters / bound."""
    engine: EngineClient = tiny_server.engine
    tokens = engine.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert len(tokens) >= len(text) // longest_token_chars(engine.tokenizer)
