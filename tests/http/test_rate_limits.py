"""Rate limits per API key over real HTTP: requests and tokens per minute, 429 with Retry-After
and OpenAI's x-ratelimit-* headers (the `openai` SDK raises RateLimitError); a key file's own
limits; the client address as the key without --api-key."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2 as httpx
import openai
import pytest
from anthropic import Anthropic
from openai import OpenAI

from mlx_engine_server.cli.config import load_settings
from mlx_engine_server.cli.proxies import trusted_proxies
from mlx_engine_server.cli.settings_errors import SettingsError
from mlx_engine_server.cli.state import rate_policy
from mlx_engine_server.http.app import ServerOptions
from mlx_engine_server.state.limits import WINDOW_S, RateLimits, RatePolicy
from mlx_engine_server.state.store import owner_of

from ..cli.test_cli import MLX_SERVER, ServerProcess, clean_env, free_port, wait_until_healthy
from ..conftest import LiveServer, close_after_test, run_live_server, start_engine

ALICE, BOB, CAROL = "key-of-alice", "key-of-bob", "key-of-carol"
DAVE, ERIN = "key-of-dave", "key-of-erin"


def fresh_window(margin_s: float = 10.0) -> None:
    """Counts restart each minute: a test that needs several requests in one waits for room."""
    left = WINDOW_S - time.time() % WINDOW_S
    if left < margin_s:
        time.sleep(left + 0.1)


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir: Path) -> Iterator[LiveServer]:
    """Every key 2 requests a minute; Alice's own limit (as a key file gives it): 40 tokens."""
    policy = RatePolicy(RateLimits(2, None), {owner_of(ALICE.encode()): RateLimits(None, 40)})
    options = ServerOptions(api_keys=(ALICE, BOB, CAROL, DAVE, ERIN), rate_limits=policy)
    live = run_live_server(start_engine(tiny_model_dir), options)
    yield live
    live.stop()


def get_models(live: LiveServer, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{live.base_url}/v1/models", headers=headers)


def test_requests_per_minute_then_429_with_retry_after(keyed_server: LiveServer) -> None:
    fresh_window()
    answers = [get_models(keyed_server, BOB) for _ in range(3)]
    assert [answer.status_code for answer in answers] == [200, 200, 429]
    assert [answer.headers["x-ratelimit-remaining-requests"] for answer in answers] == [
        "1",
        "0",
        "0",
    ]
    for answer in answers:
        assert answer.headers["x-ratelimit-limit-requests"] == "2"
        assert 0 < float(answer.headers["x-ratelimit-reset-requests"].removesuffix("s")) <= 60
        assert "x-ratelimit-limit-tokens" not in answer.headers  # no token limit for Bob
    refused = answers[-1]
    assert 1 <= int(refused.headers["retry-after"]) <= WINDOW_S
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    sdk = close_after_test(
        OpenAI(base_url=f"{keyed_server.base_url}/v1", api_key=BOB, max_retries=0)
    )
    with pytest.raises(openai.RateLimitError):
        sdk.models.list()
    assert get_models(keyed_server, CAROL).status_code == 200  # each key counts its own
    assert httpx.get(f"{keyed_server.base_url}/health").status_code == 200  # never limited
    assert get_models(keyed_server, "wrong-key").status_code == 401  # refused before counting


def test_a_keys_own_token_limit_counts_prompt_and_completion(keyed_server: LiveServer) -> None:
    fresh_window()
    sdk = close_after_test(
        OpenAI(base_url=f"{keyed_server.base_url}/v1", api_key=ALICE, max_retries=0)
    )
    raw = sdk.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "Count my tokens"}], max_tokens=30
    )
    completion = raw.parse()
    assert completion.usage is not None
    assert raw.headers["x-ratelimit-limit-tokens"] == "40"
    assert raw.headers["x-ratelimit-remaining-tokens"] == "40"  # nothing used before it
    assert "x-ratelimit-limit-requests" not in raw.headers  # Alice's own limits: tokens only
    assert completion.usage.total_tokens >= 40
    with pytest.raises(openai.RateLimitError) as refused:
        sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])
    assert refused.value.response.headers["x-ratelimit-remaining-tokens"] == "0"


def test_what_the_status_page_polls_is_not_counted(keyed_server: LiveServer) -> None:
    """The page reads /v1/mlx/status every 2 s: counted, it used a 2-a-minute key's requests
    before its chat box could send one."""
    fresh_window()
    headers = {"Authorization": f"Bearer {DAVE}"}
    for path in ("/v1/mlx/status", "/metrics", "/openapi.json") * 2:
        polled = httpx.get(f"{keyed_server.base_url}{path}", headers=headers)
        assert polled.status_code == 200, path
        assert "x-ratelimit-remaining-requests" not in polled.headers
    assert [get_models(keyed_server, DAVE).status_code for _ in range(3)] == [200, 200, 429]
    metrics = httpx.get(f"{keyed_server.base_url}/metrics", headers=headers).text
    # Refused before the router ran, the 429 is still counted, under its route's template.
    assert 'mlx_server_http_requests_total{path="/v1/models",status="429"}' in metrics


def test_an_anthropic_client_over_its_limit_gets_429_rate_limit_error(
    keyed_server: LiveServer,
) -> None:
    """Not 529 overloaded_error, which says the server is busy (it was, for every 429)."""
    fresh_window()
    assert [get_models(keyed_server, ERIN).status_code for _ in range(2)] == [200, 200]
    client = close_after_test(
        Anthropic(base_url=keyed_server.base_url, api_key=ERIN, max_retries=0)
    )
    with pytest.raises(anthropic.RateLimitError) as refused:
        client.messages.create(
            model="m", max_tokens=2, messages=[{"role": "user", "content": "Hi"}]
        )
    assert refused.value.status_code == 429
    assert refused.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert 1 <= int(refused.value.response.headers["retry-after"]) <= WINDOW_S


def test_without_keys_the_client_address_is_counted(tiny_model_dir: Path) -> None:
    options = ServerOptions(rate_limits=RatePolicy(RateLimits(1, None)))
    live = run_live_server(start_engine(tiny_model_dir), options)
    try:
        fresh_window()
        assert [get_models(live).status_code for _ in range(2)] == [200, 429]
        assert get_models(live, "any-key").status_code == 429  # a key means nothing here
    finally:
        live.stop()


@contextlib.contextmanager
def limited_process(model: Path, work: Path, *flags: str) -> Iterator[ServerProcess]:
    """`mlx-server` (uvicorn as serve() configures it): one request a minute per client
    address, JSON logs."""
    port = free_port()
    args = [str(model), "--port", str(port), "--rate-limit-rpm", "1", "--log-format", "json"]
    args += ["--cache-dir", str(work / "cache"), *flags]
    log_path = work / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([MLX_SERVER, *args], env=clean_env(), stdout=log, stderr=log)
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_until_healthy(server)
        yield server
    finally:
        process.terminate()
        process.wait(timeout=30)


def models_as(server: ServerProcess, forwarded_for: str) -> int:
    headers = {"X-Forwarded-For": forwarded_for}
    return httpx.get(f"{server.base_url}/v1/models", headers=headers, timeout=10).status_code


def logged_clients(server: ServerProcess, count: int) -> list[Any]:
    """The client address of each /v1/models line of the access log, once `count` are written
    (a line is written after its answer has gone, so the last one may lag the client)."""
    deadline = time.monotonic() + 10
    while True:
        entries = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
        clients = [entry.get("client") for entry in entries if entry.get("path") == "/v1/models"]
        if len(clients) >= count or time.monotonic() > deadline:
            return clients
        time.sleep(0.05)


def test_a_forged_forwarded_for_neither_resets_the_count_nor_is_logged(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """uvicorn's default trusted X-Forwarded-For from 127.0.0.1: a local client got a fresh
    count (and a made-up logged address) with each address it named. Now nobody is trusted
    unless --forwarded-allow-ips names the proxy."""
    with limited_process(tiny_model_dir, tmp_path) as server:
        fresh_window()
        assert [models_as(server, f"203.0.113.{n}") for n in (1, 2)] == [200, 429]
        assert logged_clients(server, 2) == ["127.0.0.1", "127.0.0.1"]


def test_forwarded_allow_ips_names_the_proxy_whose_header_is_believed(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    flags = ("--forwarded-allow-ips", "127.0.0.1")
    with limited_process(tiny_model_dir, tmp_path, *flags) as server:
        fresh_window()
        statuses = [models_as(server, f"203.0.113.{n}") for n in (1, 2, 1)]
        assert statuses == [200, 200, 429]
        assert logged_clients(server, 3) == ["203.0.113.1", "203.0.113.2", "203.0.113.1"]


def test_uvicorns_forwarded_allow_ips_is_honoured_only_without_the_setting() -> None:
    uvicorn_env = {"FORWARDED_ALLOW_IPS": "10.0.0.5"}
    assert trusted_proxies(None, {}) == ""  # nobody
    assert trusted_proxies(None, uvicorn_env) == "10.0.0.5"
    assert trusted_proxies("", uvicorn_env) == ""
    assert trusted_proxies("127.0.0.1", uvicorn_env) == "127.0.0.1"


@pytest.mark.parametrize("value", ["localhost", "10.0.0.300", "*,10.0.0.1"])
def test_a_mistyped_proxy_address_is_a_settings_error(value: str) -> None:
    """uvicorn would keep it as a name that never matches: the header silently ignored."""
    with pytest.raises(SettingsError, match="forwarded_allow_ips"):
        load_settings({"forwarded_allow_ips": value})


def test_a_key_file_line_may_set_the_keys_own_limits(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# team\nkey-a rpm=5\nkey-b tpm=900 rpm=7\nkey-c\n", encoding="utf-8")
    settings = load_settings({"api_key_file": str(keys), "rate_limit_rpm": 60})
    policy = rate_policy(settings)
    assert policy.default == RateLimits(60, None)
    assert policy.limits_for(owner_of(b"key-a")) == RateLimits(5, None)
    assert policy.limits_for(owner_of(b"key-b")) == RateLimits(7, 900)
    assert policy.limits_for(owner_of(b"key-c")) == RateLimits(60, None)


@pytest.mark.parametrize("line", ["key-a rpm=0", "key-a rpm=x", "key-a burst=3"])
def test_a_bad_key_file_option_is_a_settings_error_naming_the_line(
    tmp_path: Path, line: str
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"key-z\n{line}\n", encoding="utf-8")
    with pytest.raises(Exception, match="line 2") as error:
        load_settings({"api_key_file": str(keys)})
    assert "key-a" not in str(error.value)
