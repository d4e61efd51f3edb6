"""Two server instances on one real Redis server (as behind a proxy): a response stored through
one is continued and listed through the other, a conversation is shared, and the
rate-limit counters are one count for both."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest
from openai import OpenAI

from mlx_engine_server.http.app import ServerOptions
from mlx_engine_server.state.limits import WINDOW_S, RateLimits, RatePolicy
from mlx_engine_server.state.redis import RedisStore
from mlx_engine_server.state.store import owner_of

from ..conftest import LiveServer, close_after_test, run_live_server, start_engine
from .conftest import start_redis

KEY = "shared-key"
RPM = 5
TURN = {"model": "m", "max_output_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def pair(tiny_model_dir: Path, redis_url: str) -> Iterator[tuple[LiveServer, LiveServer]]:
    options = ServerOptions(api_keys=(KEY,), rate_limits=RatePolicy(RateLimits(RPM, None)))
    servers = [
        run_live_server(start_engine(tiny_model_dir), options, store=RedisStore(redis_url))
        for _ in range(2)
    ]
    yield servers[0], servers[1]
    for live in servers:
        live.stop()


def sdk(live: LiveServer) -> OpenAI:
    return close_after_test(OpenAI(base_url=f"{live.base_url}/v1", api_key=KEY, max_retries=0))


def room_in_this_window(needed_s: float = 15.0) -> None:
    """The counts restart each minute: the test's requests must all fall in one."""
    left = WINDOW_S - time.time() % WINDOW_S
    if left < needed_s:
        time.sleep(left + 0.1)


def test_state_is_shared_and_so_are_the_rate_limits(pair: tuple[LiveServer, LiveServer]) -> None:
    one, other = pair
    room_in_this_window()
    first = sdk(one).responses.create(input="Hello there", **TURN)
    continued = sdk(other).responses.create(
        input="And then?", previous_response_id=first.id, **TURN
    )
    assert continued.usage is not None
    assert first.usage is not None
    assert continued.usage.input_tokens > first.usage.input_tokens
    listed = sdk(one).responses.input_items.list(continued.id)
    assert [item.content[0].text for item in listed.data] == ["And then?"]  # type: ignore[union-attr]
    conversation = sdk(other).conversations.create(
        items=[{"type": "message", "role": "user", "content": "shared"}]
    )
    assert sdk(one).conversations.retrieve(conversation.id).id == conversation.id
    # five requests so far, three through one and two through the other: the minute is used up
    for live in (one, other):
        refused = httpx.get(f"{live.base_url}/v1/models", headers={"x-api-key": KEY})
        assert refused.status_code == 429
        assert refused.headers["x-ratelimit-limit-requests"] == str(RPM)
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"


def test_a_failing_store_is_a_503_and_the_server_keeps_serving(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    url, redis_process = start_redis(tmp_path)
    limited = {owner_of(b"limited-key"): RateLimits(100, None)}
    options = ServerOptions(
        api_keys=("limited-key", "free-key"), rate_limits=RatePolicy(per_owner=limited)
    )
    live = run_live_server(start_engine(tiny_model_dir), options, store=RedisStore(url))
    try:
        redis_process.kill()
        redis_process.wait(timeout=10)
        free = {"Authorization": "Bearer free-key"}
        for method, path, headers in (
            ("GET", "/v1/responses/resp_1", free),
            ("GET", "/v1/models", {"Authorization": "Bearer limited-key"}),  # counted first
        ):
            answer = httpx.request(method, f"{live.base_url}{path}", headers=headers, timeout=30)
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["code"] == "state_store_unavailable"
        chat = httpx.post(
            f"{live.base_url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
            headers=free,
            timeout=60,
        )
        assert chat.status_code == 200, chat.text  # no state asked for: served as before
    finally:
        live.stop()
