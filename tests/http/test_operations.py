"""Operations over HTTP: request ids, one structured log line per request, proxy headers."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from mlx_engine_server.cli.logs import JsonFormatter, TextFormatter, escape_control
from mlx_engine_server.engine import EngineOptions, counters
from mlx_engine_server.http.app import ServerOptions, create_app

from ..conftest import LiveServer, start_engine

ACCESS_LOGGER = "mlx_engine_server.access"
SECRET_PROMPT = "my very private question about zebras"  # noqa: S105 - not a password


def chat_body(content: str = SECRET_PROMPT, **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 3, **fields}


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == ACCESS_LOGGER]


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    fields: dict[str, Any] = record.fields  # type: ignore[attr-defined]
    return fields


@pytest.fixture(scope="module")
def prompt_logging_client(tiny_model_dir: Path) -> Iterator[TestClient]:
    engine = start_engine(tiny_model_dir)
    with TestClient(create_app(engine, ServerOptions(log_prompts=True))) as client:
        yield client


# --- request ids ----------------------------------------------------------------------------


def test_incoming_request_id_is_kept_and_returned(client: TestClient) -> None:
    response = client.get("/v1/models", headers={"X-Request-ID": "proxy-abc.123:7"})
    assert response.headers["x-request-id"] == "proxy-abc.123:7"


@pytest.mark.parametrize(
    "incoming", [None, "", "x" * 200, "has space", 'quote"s', "\xe9-latin1".encode("latin-1")]
)
def test_missing_or_odd_request_id_is_replaced(
    client: TestClient, incoming: str | bytes | None
) -> None:
    headers = {} if incoming is None else {"X-Request-ID": incoming}
    response = client.get("/v1/models", headers=headers)
    generated = response.headers["x-request-id"]
    assert generated != incoming
    assert len(generated) == 32
    int(generated, 16)


def test_errors_carry_a_request_id_too(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", content=b"{broken")
    assert response.status_code == 400
    assert len(response.headers["x-request-id"]) == 32


# --- one log line per request ---------------------------------------------------------------


def test_log_line_has_the_request_facts_and_no_prompt(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        response = client.post(
            "/v1/chat/completions", json=chat_body(), headers={"X-Request-ID": "req-42"}
        )
    assert response.status_code == 200
    (record,) = access_records(caplog)
    fields = fields_of(record)
    usage = response.json()["usage"]
    assert fields["request_id"] == "req-42"
    assert (fields["method"], fields["path"], fields["status"]) == (
        "POST",
        "/v1/chat/completions",
        200,
    )
    assert fields["prompt_tokens"] == usage["prompt_tokens"]
    assert fields["completion_tokens"] == usage["completion_tokens"] == 3
    assert fields["cached_tokens"] == usage["prompt_tokens_details"]["cached_tokens"]
    assert 0 < fields["ttft_s"] <= fields["duration_s"]
    assert "prompt" not in fields
    line = TextFormatter().format(record) + JsonFormatter().format(record)
    assert SECRET_PROMPT not in line
    assert "zebras" not in line


def test_streamed_request_is_logged_once_it_ends(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.INFO, logger=ACCESS_LOGGER),
        client.stream(
            "POST", "/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "stream": True}
        ) as response,
    ):
        assert response.status_code == 200
        body = "".join(response.iter_text())
    assert body.rstrip().endswith("data: [DONE]")
    (record,) = access_records(caplog)
    assert fields_of(record)["completion_tokens"] == 4
    assert fields_of(record)["ttft_s"] > 0


def test_stream_cut_by_shutdown_logs_the_tokens_it_streamed(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = start_engine(tiny_model_dir, EngineOptions(shutdown_grace_s=0.0))
    body = {"prompt": "Hi", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with (
        TestClient(create_app(engine)) as client,
        caplog.at_level(logging.INFO, logger=ACCESS_LOGGER),
        client.stream("POST", "/v1/completions", json=body) as response,
    ):
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        engine.drain()
        rest = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    chunks = [json.loads(first.removeprefix("data: "))] + [json.loads(x) for x in rest[:-2]]
    assert json.loads(rest[-2])["error"]["code"] == "service_unavailable"
    (record,) = access_records(caplog)
    streamed = fields_of(record)["completion_tokens"]
    assert len(chunks) <= streamed < 200


def test_refusal_log_line_says_why(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        openai = client.post("/v1/chat/completions", json={"messages": []})
        anthropic = client.post("/v1/messages", json={"model": "m", "messages": []})
    assert (openai.status_code, anthropic.status_code) == (400, 400)
    first, second = (fields_of(record) for record in access_records(caplog))
    assert first["error_code"] == openai.json()["error"]["code"]
    assert first["error_message"] == openai.json()["error"]["message"]
    assert second["error_code"] == anthropic.json()["error"]["type"]
    assert second["error_message"] == anthropic.json()["error"]["message"]
    assert "error_message=" in TextFormatter().format(access_records(caplog)[0])


def test_successful_log_line_has_no_error_fields(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        client.get("/v1/models")
    (record,) = access_records(caplog)
    assert "error_code" not in fields_of(record)


def test_prompt_is_logged_only_with_log_prompts(
    prompt_logging_client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        response = prompt_logging_client.post("/v1/chat/completions", json=chat_body())
    assert response.status_code == 200
    (record,) = access_records(caplog)
    assert fields_of(record)["prompt"] == SECRET_PROMPT
    assert SECRET_PROMPT in TextFormatter().format(record)


def test_refused_requests_are_logged_with_their_status(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        client.get("/no/such/path")
    (record,) = access_records(caplog)
    assert fields_of(record)["status"] == 404
    assert fields_of(record)["prompt_tokens"] is None


def test_control_characters_cannot_forge_log_lines(
    prompt_logging_client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    forged = "hi\n2026-01-01 00:00:00 INFO fake: admin logged in\x1b[31m\u2028"
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        prompt_logging_client.post("/v1/chat/completions", json=chat_body(forged))
        prompt_logging_client.get("/v1/models/%0Afake%1b[2J")
    assert len(access_records(caplog)) == 2
    for record in access_records(caplog):
        text_line = TextFormatter().format(record)
        json_line = JsonFormatter().format(record)
        for line in (text_line, json_line):
            assert "\n" not in line
            assert "\x1b" not in line
            assert "\u2028" not in line
        assert json.loads(json_line)["request_id"]
    assert "\\x0a" in TextFormatter().format(access_records(caplog)[1])


def test_escape_control_keeps_ordinary_text() -> None:
    assert escape_control("Grüße, 世界 — ok") == "Grüße, 世界 — ok"
    assert escape_control("a\tb\x00c\x7f\x85") == "a\\x09b\\x00c\\x7f\\x85"


def test_json_formatter_writes_one_object_with_the_fields() -> None:
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "hello %s", ("you",), None)
    record.fields = {"request_id": "r1", "status": 200}
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "hello you"
    assert entry["level"] == "warning"
    assert (entry["request_id"], entry["status"]) == ("r1", 200)
    assert entry["time"].endswith("Z")


# --- headers for proxies --------------------------------------------------------------------


def test_sse_responses_tell_nginx_not_to_buffer(client: TestClient) -> None:
    body = chat_body("Hi", stream=True, max_tokens=2)
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["x-mlx-cached-tokens"].isdigit()
        response.read()


def test_cached_tokens_header_matches_usage_and_grows_on_a_repeat(client: TestClient) -> None:
    body = chat_body("A question asked twice, to reuse the cached prefix.", temperature=0)
    first = client.post("/v1/chat/completions", json=body)
    second = client.post("/v1/chat/completions", json=body)
    for response in (first, second):
        cached = response.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert response.headers["x-mlx-cached-tokens"] == str(cached)
    assert int(second.headers["x-mlx-cached-tokens"]) > 0
    streamed = {**body, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=streamed) as response:
        assert int(response.headers["x-mlx-cached-tokens"]) > 0
        response.read()


def test_status_reports_load_for_balancers(client: TestClient) -> None:
    engine = client.get("/v1/mlx/status").json()["engine"]
    assert engine["requests_active"] == 0
    assert engine["requests_queued"] == 0


def test_tokens_per_s_falls_to_zero_when_idle(
    fresh_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rate over the last window, as of the moment it is read, not of the last step."""
    monkeypatch.setattr(counters, "RATE_WINDOW_S", 0.5)
    fresh_client.post("/v1/chat/completions", json=chat_body(max_tokens=8, ignore_eos=True))
    busy = fresh_client.get("/v1/mlx/status").json()["engine"]["tokens_per_s"]
    time.sleep(0.6)
    idle = fresh_client.get("/v1/mlx/status").json()["engine"]["tokens_per_s"]
    assert busy > 0
    assert idle == 0


def test_rate_counts_only_the_window() -> None:
    rates = counters.Counters()
    rates.record_step(5)
    rates.record_step(5)
    now = time.monotonic()
    assert rates.tokens_per_s(now) == pytest.approx(10 / counters.RATE_WINDOW_S)
    assert rates.tokens_per_s(now + counters.RATE_WINDOW_S + 0.1) == 0


# --- metrics --------------------------------------------------------------------------------


def http_request_labels(metrics_text: str) -> set[tuple[str, str]]:
    return {
        (sample.labels["path"], sample.labels["status"])
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == "mlx_server_http_requests_total"
    }


def test_metrics_label_every_route_with_its_template(tiny_server: LiveServer) -> None:
    base = tiny_server.base_url
    calls = [
        ("POST", "/v1/messages", {"model": "m", "max_tokens": 2, "messages": []}),
        ("POST", "/v1/messages/count_tokens", {"model": "m", "messages": []}),
        ("POST", "/v1/responses", {"input": "Hi", "max_output_tokens": 2}),
        ("POST", "/tokenize", {"prompt": "Hi"}),
        ("POST", "/detokenize", {"tokens": [1]}),
        ("GET", "/openapi.json", None),
        ("GET", "/v1/models/tiny-llama", None),
        ("GET", "/v1/models/some/other/model", None),
        ("GET", "/no/such/path", None),
        ("GET", "/v1/messages", None),  # a route, the wrong method: 405 under its template
    ]
    statuses = {
        (method, path): str(httpx.request(method, base + path, json=body).status_code)
        for method, path, body in calls
    }
    labels = http_request_labels(httpx.get(f"{base}/metrics").text)

    for path in ("/v1/messages", "/v1/messages/count_tokens", "/v1/responses"):
        assert (path, statuses["POST", path]) in labels, (path, labels)
    for path in ("/tokenize", "/detokenize"):
        assert (path, statuses["POST", path]) in labels, (path, labels)
    assert ("/v1/messages", "405") in labels
    assert ("/openapi.json", "200") in labels
    assert ("/v1/models/{model_id}", "200") in labels
    assert ("/v1/models/{model_id}", "404") in labels
    assert ("other", "404") in labels
    assert {path for path, _ in labels} <= {*KNOWN_TEMPLATES, "other"}


KNOWN_TEMPLATES = {
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/v1/models/{model_id}",
    "/v1/mlx/status",
    "/health",
    "/metrics",
    "/tokenize",
    "/detokenize",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/responses",
    "/openapi.json",
}
