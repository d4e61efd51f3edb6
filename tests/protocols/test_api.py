"""The OpenAI surface over in-process HTTP with a tiny real model, checked with the SDK's types."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from ..conftest import TINY_CONTEXT_WINDOW

HELLO = [{"role": "user", "content": "Hello there"}]


def chat(client: TestClient, **fields: Any) -> dict[str, Any]:
    body = {"messages": HELLO, "max_tokens": 8, "temperature": 0, **fields}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def sse_payloads(client: TestClient, path: str, body: dict[str, Any]) -> list[str]:
    """Every `data:` payload of a streamed response, in order."""
    payloads = []
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                payloads.append(line[len("data: ") :])
    return payloads


def test_chat_completion_parses_as_openai_type(client: TestClient) -> None:
    completion = ChatCompletion.model_validate(chat(client, max_tokens=5))
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5
    assert completion.usage.prompt_tokens > len(["Hello", "there"])
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 5
    assert completion.usage.prompt_tokens_details is not None
    # Earlier tests on the same server may have cached the chat template's opening.
    cached = completion.usage.prompt_tokens_details.cached_tokens
    assert cached is not None
    assert 0 <= cached < completion.usage.prompt_tokens


def test_greedy_is_deterministic_and_model_accepted_whatever_it_says(client: TestClient) -> None:
    first = chat(client, model="gpt-4o")
    second = chat(client, model="anything-at-all")
    assert first["choices"][0]["message"] == second["choices"][0]["message"]
    assert first["model"] == second["model"] == "tiny-llama"


def test_streamed_chat_equals_non_streamed(client: TestClient) -> None:
    whole = chat(client)["choices"][0]["message"]["content"]
    body = {"messages": HELLO, "max_tokens": 8, "temperature": 0, "stream": True}
    payloads = sse_payloads(client, "/v1/chat/completions", body)
    assert payloads[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(json.loads(p)) for p in payloads[:-1]]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len({chunk.id for chunk in chunks}) == 1
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert streamed == whole


def test_stream_include_usage_sends_a_last_usage_chunk(client: TestClient) -> None:
    body = {
        "messages": HELLO,
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    payloads = sse_payloads(client, "/v1/chat/completions", body)
    chunks = [ChatCompletionChunk.model_validate(json.loads(p)) for p in payloads[:-1]]
    assert all(chunk.usage is None for chunk in chunks[:-1])
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 4


def test_text_completion_and_its_stream(client: TestClient) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    completion = Completion.model_validate(response.json())
    assert completion.object == "text_completion"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 6
    payloads = sse_payloads(client, "/v1/completions", {**body, "stream": True})
    assert payloads[-1] == "[DONE]"
    raw_chunks = [json.loads(p) for p in payloads[:-1]]
    # OpenAI streams finish_reason null until the last chunk; the SDK's type only fits the last.
    assert all(c["choices"][0]["finish_reason"] is None for c in raw_chunks[:-1])
    last = Completion.model_validate(raw_chunks[-1])
    assert last.choices[0].finish_reason == "length"
    assert "".join(c["choices"][0]["text"] for c in raw_chunks) == completion.choices[0].text


def test_completion_accepts_token_ids_and_a_one_string_list(client: TestClient) -> None:
    as_text = client.post("/v1/completions", json={"prompt": ["Hi"], "max_tokens": 3}).json()
    assert as_text["usage"]["completion_tokens"] == 3
    ids = client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 3}).json()
    assert ids["usage"]["prompt_tokens"] == 3


@pytest.mark.parametrize(
    ("prompt", "prompt_tokens"),
    [("", 1), ([""], 1), (["a", ""], 2), ([[]], 1), ([[5], []], 2)],
)
@pytest.mark.parametrize("stream", [False, True])
def test_an_empty_prompt_is_completed_from_the_start_of_a_text(
    client: TestClient, prompt: Any, prompt_tokens: int, stream: bool
) -> None:
    """As OpenAI does: an empty prompt is one beginning-of-sequence token (SmolLM2's is id 1)."""
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
        payloads = sse_payloads(client, "/v1/completions", body)
        assert payloads[-1] == "[DONE]"
        usage = json.loads(payloads[-2])["usage"]
    else:
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert len(answer["choices"]) == (len(prompt) if isinstance(prompt, list) else 1)
        usage = answer["usage"]
    assert usage["completion_tokens"] > 0
    assert usage["prompt_tokens"] == prompt_tokens


def test_stop_string_cuts_the_text_and_is_not_returned(client: TestClient) -> None:
    text = chat(client, max_tokens=12)["choices"][0]["message"]["content"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), f"need a visible stop string from {text!r}"
    result = chat(client, max_tokens=12, stop=[stop])
    assert result["choices"][0]["finish_reason"] == "stop"
    assert result["choices"][0]["message"]["content"] == text[: text.index(stop)]


def test_a_stop_string_completed_by_the_last_allowed_token_is_a_stop(client: TestClient) -> None:
    """OpenAI reports `stop` when the stop sequence ends the text, even on the last token."""
    text = chat(client, max_tokens=12, ignore_eos=True)["choices"][0]["message"]["content"]
    ending = next(
        text[-size:]
        for size in range(1, len(text) + 1)
        if text.find(text[-size:]) == len(text) - size
    )
    assert ending.strip(), f"need a visible ending from {text!r}"
    result = chat(client, max_tokens=12, ignore_eos=True, stop=[ending])
    assert result["choices"][0]["finish_reason"] == "stop"
    assert result["choices"][0]["message"]["content"] == text[: -len(ending)]


def test_content_as_text_parts_equals_plain_string(client: TestClient) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]
    assert chat(client, messages=parts)["choices"] == chat(client)["choices"]


def test_seed_reproduces_sampling(client: TestClient) -> None:
    def sample(seed: int) -> str:
        result = chat(client, temperature=1.0, seed=seed, max_tokens=10)
        return str(result["choices"][0]["message"]["content"])

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in (1, 2, 3)}) > 1


def test_logit_bias_forces_a_token(client: TestClient) -> None:
    forced = 1000
    result = client.post(
        "/v1/completions",
        json={"prompt": "Hi", "max_tokens": 3, "temperature": 0, "logit_bias": {str(forced): 100}},
    )
    tokenizer_text = client.post(
        "/v1/completions", json={"prompt": [forced, forced, forced], "max_tokens": 1}
    )
    assert tokenizer_text.status_code == 200
    text = result.json()["choices"][0]["text"]
    assert text
    assert len(set(text.split())) <= 1


def test_unknown_fields_are_ignored(client: TestClient) -> None:
    assert chat(client, user="someone", metadata={"a": "1"}, parallel_tool_calls=True)["choices"]


def test_penalties_and_filters_are_accepted(client: TestClient) -> None:
    result = chat(
        client,
        temperature=0.7,
        top_p=0.9,
        top_k=20,
        min_p=0.05,
        seed=1,
        repetition_penalty=1.3,
        presence_penalty=0.5,
        frequency_penalty=0.5,
    )
    assert result["usage"]["completion_tokens"] == 8


def test_models_list_and_card(client: TestClient) -> None:
    listing = client.get("/v1/models").json()
    assert listing["object"] == "list"
    (card,) = listing["data"]
    model = Model.model_validate(card)
    assert model.id == "tiny-llama"
    assert model.owned_by
    assert card["context_window"] == TINY_CONTEXT_WINDOW
    assert client.get("/v1/models/tiny-llama").json() == card


def test_health_status_and_metrics(client: TestClient) -> None:
    assert client.get("/health").json()["status"] == "ok"
    chat(client, max_tokens=2)
    status = client.get("/v1/mlx/status").json()
    assert status["model"]["id"] == "tiny-llama"
    assert status["model"]["kind"] == "text"
    assert status["model"]["context_window"] == TINY_CONTEXT_WINDOW
    assert status["device"]["name"]
    assert status["device"]["memory"]["peak_bytes"] > 0
    assert status["counters"]["requests_total"] >= 1
    assert status["counters"]["completion_tokens_total"] >= 2
    assert status["engine"]["tokens_per_s"] > 0
    assert status["uptime_s"] > 0


def test_metrics_are_prometheus_text_with_latency_histograms(client: TestClient) -> None:
    chat(client, max_tokens=3)
    client.post("/v1/chat/completions", json={"messages": []})
    client.get("/no/such/path")
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("mlx_server_http_requests_total", path="/v1/chat/completions", status="200") >= 1
    assert value("mlx_server_http_requests_total", path="/v1/chat/completions", status="400") >= 1
    assert value("mlx_server_http_requests_total", path="other", status="404") >= 1
    assert value("mlx_server_time_to_first_token_seconds_count") >= 1
    assert value("mlx_server_inter_token_latency_seconds_count") >= 1
    assert value("mlx_server_completion_tokens_total") >= 3
    assert value("mlx_server_batch_size") == 0
    assert value("mlx_server_prefix_cache_entries") >= 1


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    error: dict[str, Any] = body["error"]
    return error


BAD_CHAT_BODIES = [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0]"),
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ({"messages": HELLO, "max_tokens": -1}, "max_tokens"),
    ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
    ({"messages": HELLO, "max_tokens": 5.5}, "max_tokens"),
    ({"messages": HELLO, "max_tokens": "5"}, "max_tokens"),
    ({"messages": HELLO, "max_completion_tokens": -3}, "max_completion_tokens"),
    ({"messages": HELLO, "temperature": 2.5}, "temperature"),
    ({"messages": HELLO, "temperature": "hot"}, "temperature"),
    ({"messages": HELLO, "top_p": 1.5}, "top_p"),
    ({"messages": HELLO, "min_p": -0.1}, "min_p"),
    ({"messages": HELLO, "presence_penalty": 3}, "presence_penalty"),
    ({"messages": HELLO, "frequency_penalty": -3}, "frequency_penalty"),
    ({"messages": HELLO, "repetition_penalty": 0}, "repetition_penalty"),
    ({"messages": HELLO, "n": 9}, "n"),
    ({"messages": HELLO, "n": 0}, "n"),
    ({"messages": HELLO, "stop": ["x"] * 17}, "stop"),
    ({"messages": HELLO, "stream": "yes"}, "stream"),
    ({"messages": HELLO, "logit_bias": {"1": 500}}, "logit_bias.1"),
    ({"messages": HELLO, "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"messages": HELLO, "logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"messages": HELLO, "seed": "x"}, "seed"),
]


@pytest.mark.parametrize(("body", "param"), BAD_CHAT_BODIES)
def test_bad_chat_requests_are_400_naming_the_parameter(
    client: TestClient, body: dict[str, Any], param: str
) -> None:
    error = error_of(client.post("/v1/chat/completions", json=body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


# Keys that str.isdigit() takes but are no ASCII decimal token id, signs, spaces, huge and
# out-of-vocabulary ids: each one a 400 naming logit_bias on every route that takes it.
NOT_TOKEN_ID_KEYS = [
    "²",
    "①",
    "٣",
    "\uff13",
    " 3",
    "3 ",
    "+3",
    "-1",
    "3.0",
    "",
    "9" * 5000,
    "49152",
]


@pytest.mark.parametrize("key", NOT_TOKEN_ID_KEYS)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_logit_bias_keys_are_ascii_token_ids(client: TestClient, path: str, key: str) -> None:
    body: dict[str, Any] = {"max_tokens": 1, "logit_bias": {"7": 1, key: 5}}
    body |= {"messages": HELLO} if path.endswith("chat/completions") else {"prompt": "Hi"}
    error = error_of(client.post(path, json=body), 400)
    assert error["param"] == "logit_bias"
    assert key[:20] in error["message"] or len(key) > 20


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"[1, 2]", b'"text"', b"", b'{"messages": NaN}', b"\xff\xfe", b"[" * 100_000],
)
def test_malformed_bodies_are_400(client: TestClient, raw: bytes) -> None:
    response = client.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    error_of(response, 400)


def test_lone_surrogates_are_400_but_surrogate_pairs_are_text(client: TestClient) -> None:
    lone = b'{"messages": [{"role": "user", "content": "a\\udc00b"}], "max_tokens": 2}'
    error = error_of(client.post("/v1/chat/completions", content=lone), 400)
    assert error["code"] == "invalid_unicode"
    pair = b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}], "max_tokens": 2}'
    assert client.post("/v1/chat/completions", content=pair).status_code == 200


def test_bad_completion_prompts_are_400(client: TestClient) -> None:
    cases = (([], "prompt"), ([-1], "prompt[0]"), (5, "prompt"), ([[1], [2, -1]], "prompt[1][1]"))
    for prompt, param in cases:
        response = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
        assert error_of(response, 400)["param"] == param, prompt
    huge_id = client.post("/v1/completions", json={"prompt": [1, 10**9], "max_tokens": 2})
    assert error_of(huge_id, 400)["param"] == "prompt[1]"


def test_context_length_exceeded(client: TestClient) -> None:
    too_long = client.post(
        "/v1/chat/completions", json={"messages": HELLO, "max_tokens": TINY_CONTEXT_WINDOW}
    )
    error = error_of(too_long, 400)
    assert error["code"] == "context_length_exceeded"
    assert str(TINY_CONTEXT_WINDOW) in error["message"]
    huge_prompt = [{"role": "user", "content": "word " * 400}]
    response = client.post("/v1/chat/completions", json={"messages": huge_prompt})
    assert error_of(response, 400)["code"] == "context_length_exceeded"


def test_streaming_request_errors_come_before_the_stream(client: TestClient) -> None:
    body = {"messages": HELLO, "max_tokens": TINY_CONTEXT_WINDOW, "stream": True}
    response = client.post("/v1/chat/completions", json=body)
    assert response.headers["content-type"].startswith("application/json")
    assert error_of(response, 400)["code"] == "context_length_exceeded"


def test_unknown_path_and_wrong_method(client: TestClient) -> None:
    assert error_of(client.get("/v1/nothing-here"), 404)["code"] == "unknown_url"
    assert error_of(client.get("/v1/chat/completions"), 405)["code"] == "method_not_allowed"
    assert error_of(client.get("/v1/models/other-model"), 404)["code"] == "model_not_found"


def test_server_keeps_serving_after_errors(client: TestClient) -> None:
    for raw in (b"{", b"[]", b"null"):
        client.post("/v1/chat/completions", content=raw)
    assert chat(client, max_tokens=2)["usage"]["completion_tokens"] == 2


def test_end_of_sequence_stops_unless_ignore_eos(client: TestClient) -> None:
    eos = 2  # <|im_end|> in SmolLM2's vocabulary
    forced = {"prompt": "Hi", "max_tokens": 4, "temperature": 0, "logit_bias": {str(eos): 100}}
    stopped = client.post("/v1/completions", json=forced).json()
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["choices"][0]["text"] == ""
    assert stopped["usage"]["completion_tokens"] == 1
    kept = client.post("/v1/completions", json={**forced, "ignore_eos": True}).json()
    assert kept["choices"][0]["finish_reason"] == "length"
    assert kept["usage"]["completion_tokens"] == 4
