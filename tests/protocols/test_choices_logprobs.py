"""Logprobs, n > 1, several prompts, echo and the tokenizer endpoints over real HTTP."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import httpx2 as httpx
import mlx.core as mx
import pytest
from mlx_lm import load
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from starlette.testclient import TestClient

from ..conftest import LiveServer
from .test_api import HELLO, error_of, sse_payloads


def post(client: TestClient, path: str, **body: Any) -> dict[str, Any]:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def chat_logprobs(client: TestClient, **fields: Any) -> dict[str, Any]:
    fields = {"messages": HELLO, "max_tokens": 6, "temperature": 0, "logprobs": True, **fields}
    return post(client, "/v1/chat/completions", **fields)


def test_chat_logprobs_shape_and_greedy_consistency(client: TestClient) -> None:
    completion = ChatCompletion.model_validate(chat_logprobs(client, top_logprobs=3))
    choice = completion.choices[0]
    assert choice.logprobs is not None
    content = choice.logprobs.content or []
    assert len(content) == 6 == completion.usage.completion_tokens  # type: ignore[union-attr]
    text = b"".join(bytes(entry.bytes or []) for entry in content).decode()
    assert text == choice.message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3
        values = [top.logprob for top in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert sum(math.exp(value) for value in values) <= 1.0 + 1e-5
        # greedy picks the most likely token
        assert entry.top_logprobs[0].token == entry.token
        assert entry.logprob == pytest.approx(values[0])


def test_first_logprob_matches_the_model_run_directly(
    client: TestClient, tiny_model_dir: Path
) -> None:
    """An independent check of the numbers: the model's own softmax over the same prompt."""
    ids = post(client, "/tokenize", messages=HELLO)["tokens"]
    first = chat_logprobs(client, max_tokens=1, top_logprobs=2)["choices"][0]["logprobs"]
    model, _ = load(str(tiny_model_dir))
    logits = model(mx.array([ids]))[0, -1].astype(mx.float32)
    expected = logits - mx.logsumexp(logits)
    token_id = int(mx.argmax(expected).item())
    assert first["content"][0]["logprob"] == pytest.approx(expected[token_id].item(), abs=1e-3)
    second = mx.sort(expected)[-2].item()
    assert first["content"][0]["top_logprobs"][1]["logprob"] == pytest.approx(second, abs=1e-3)


def test_chat_logprobs_stream_in_chunks_equal_to_the_whole(client: TestClient) -> None:
    whole = chat_logprobs(client, top_logprobs=2)["choices"][0]["logprobs"]["content"]
    body = {
        "messages": HELLO,
        "max_tokens": 6,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
        "stream": True,
    }
    payloads = sse_payloads(client, "/v1/chat/completions", body)
    chunks = [ChatCompletionChunk.model_validate(json.loads(p)) for p in payloads[:-1]]
    streamed = [
        entry.model_dump()
        for chunk in chunks
        if chunk.choices[0].logprobs is not None
        for entry in chunk.choices[0].logprobs.content or []
    ]
    assert streamed == whole


def test_logprobs_off_sends_null(client: TestClient) -> None:
    result = post(client, "/v1/chat/completions", messages=HELLO, max_tokens=2)
    assert result["choices"][0]["logprobs"] is None


def test_completion_logprobs_in_the_legacy_shape(client: TestClient) -> None:
    body = {"prompt": "Once upon", "max_tokens": 5, "temperature": 0, "logprobs": 2}
    completion = Completion.model_validate(post(client, "/v1/completions", **body))
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None
    tokens = logprobs.tokens or []
    assert len(tokens) == len(logprobs.token_logprobs or []) == 5
    assert all(len(top) <= 2 for top in logprobs.top_logprobs or [])
    offsets = logprobs.text_offset or []
    assert offsets[0] == 0
    assert offsets[1:] == [offsets[i] + len(tokens[i]) for i in range(4)]
    streamed = sse_payloads(client, "/v1/completions", {**body, "stream": True})
    chunks = [json.loads(p) for p in streamed[:-1]]
    streamed_offsets = [
        offset
        for chunk in chunks
        if chunk["choices"][0]["logprobs"]
        for offset in chunk["choices"][0]["logprobs"]["text_offset"]
    ]
    assert streamed_offsets == offsets


def test_echo_repeats_the_prompt(client: TestClient) -> None:
    body = {"prompt": "Once upon", "max_tokens": 3, "temperature": 0}
    plain = post(client, "/v1/completions", **body)["choices"][0]["text"]
    echoed = post(client, "/v1/completions", **body, echo=True)["choices"][0]["text"]
    assert echoed == "Once upon" + plain
    payloads = sse_payloads(client, "/v1/completions", {**body, "echo": True, "stream": True})
    assert "".join(json.loads(p)["choices"][0]["text"] for p in payloads[:-1]) == echoed


def test_echo_with_logprobs_is_refused(client: TestClient) -> None:
    body = {"prompt": "Hi", "max_tokens": 2, "echo": True, "logprobs": 1}
    assert error_of(client.post("/v1/completions", json=body), 400)["param"] == "echo"


def test_n_choices_are_indexed_seeded_and_counted(client: TestClient) -> None:
    body = {"messages": HELLO, "max_tokens": 6, "temperature": 1.0, "seed": 5, "n": 3}
    first = ChatCompletion.model_validate(post(client, "/v1/chat/completions", **body))
    again = ChatCompletion.model_validate(post(client, "/v1/chat/completions", **body))
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1, "each choice samples with its own seed"
    single = post(client, "/v1/chat/completions", **{**body, "n": 1})
    assert single["choices"][0]["message"]["content"] == texts[0]
    usage = first.usage
    assert usage is not None
    assert usage.completion_tokens == 18
    assert usage.prompt_tokens == single["usage"]["prompt_tokens"]


def test_n_choices_stream_with_their_indexes(client: TestClient) -> None:
    body = {"messages": HELLO, "max_tokens": 5, "temperature": 1.0, "seed": 9, "n": 2}
    whole = post(client, "/v1/chat/completions", **body)
    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    payloads = sse_payloads(client, "/v1/chat/completions", stream_body)
    chunks = [ChatCompletionChunk.model_validate(json.loads(p)) for p in payloads[:-1]]
    texts = {0: "", 1: ""}
    finished = set()
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finished.add(choice.index)
    assert finished == {0, 1}
    assert [texts[0], texts[1]] == [c["message"]["content"] for c in whole["choices"]]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 10


def test_completion_prompts_as_lists_each_with_n_choices(client: TestClient) -> None:
    ids = post(client, "/tokenize", prompt="Once upon")["tokens"]
    body = {"max_tokens": 3, "temperature": 0, "n": 2}
    by_text = post(client, "/v1/completions", prompt=["Once upon", "Hello"], **body)
    by_ids = post(client, "/v1/completions", prompt=[ids, ids], **body)
    assert [c["index"] for c in by_text["choices"]] == [0, 1, 2, 3]
    texts = [c["text"] for c in by_text["choices"]]
    assert texts[0] == texts[1] == by_ids["choices"][0]["text"]  # greedy: n copies agree
    single = post(client, "/v1/completions", prompt="Hello", max_tokens=3, temperature=0)
    assert texts[2] == single["choices"][0]["text"]
    assert by_text["usage"]["prompt_tokens"] == len(ids) + single["usage"]["prompt_tokens"]
    assert by_text["usage"]["completion_tokens"] == 12


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": HELLO, "top_logprobs": 2}, "top_logprobs"),
        (
            "/v1/chat/completions",
            {"messages": HELLO, "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
        ),
        ("/v1/chat/completions", {"messages": HELLO, "n": 9}, "n"),
        ("/v1/completions", {"prompt": "Hi", "logprobs": 21}, "logprobs"),
        ("/v1/completions", {"prompt": ["x"] * 17}, "prompt"),
        ("/v1/completions", {"prompt": [[1, 2], [3, 10**9]]}, "prompt[1][1]"),
        ("/v1/completions", {"prompt": "Hi", "n": 2, "best_of": 3}, "best_of"),
    ],
)
def test_bad_choice_and_logprob_requests_are_400(
    client: TestClient, path: str, body: dict[str, Any], param: str
) -> None:
    assert error_of(client.post(path, json={"max_tokens": 2, **body}), 400)["param"] == param


def test_tokenize_counts_what_a_chat_request_is_charged(client: TestClient) -> None:
    counted = post(client, "/tokenize", messages=HELLO)
    assert counted["count"] == len(counted["tokens"])
    assert counted["max_model_len"] == 256
    charged = post(client, "/v1/chat/completions", messages=HELLO, max_tokens=1)
    assert counted["count"] == charged["usage"]["prompt_tokens"]
    with_strs = post(client, "/tokenize", prompt="Hello world", return_token_strs=True)
    assert len(with_strs["token_strs"]) == with_strs["count"]
    back = post(client, "/detokenize", tokens=with_strs["tokens"])
    assert back == {"prompt": "Hello world"}


LOOKUP = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    "fields",
    [
        {"chat_template_kwargs": {"enable_thinking": True}},
        {"tools": [LOOKUP]},
        {"tools": [LOOKUP], "tool_choice": "none"},
    ],
)
def test_tokenize_renders_the_chat_fields_a_chat_request_renders(
    hermes_agent_server: LiveServer, fields: dict[str, Any]
) -> None:
    """A template that opens <think> for enable_thinking and lists tools: /tokenize counted
    neither (it read only the messages), so its count was not what the chat request is charged."""
    base = hermes_agent_server.base_url

    def count(**more: Any) -> int:
        answer = httpx.post(f"{base}/tokenize", json={"messages": HELLO, **more}, timeout=60)
        assert answer.status_code == 200, answer.text
        result: int = answer.json()["count"]
        return result

    chat = {"messages": HELLO, "max_tokens": 1, **fields}
    charged = httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=60)
    assert charged.status_code == 200, charged.text
    assert count(**fields) == charged.json()["usage"]["prompt_tokens"]
    if fields.get("tool_choice") == "none":  # the model is not shown the tools at all
        assert count(**fields) == count()
    else:
        assert count(**fields) > count()


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/tokenize", {"messages": HELLO, "tool_choice": "required"}, "tool_choice"),
        (
            "/tokenize",
            {"messages": HELLO, "chat_template_kwargs": {"tools": 1}},
            "chat_template_kwargs.tools",
        ),
        ("/detokenize", {"tokens": [1, 10**9]}, "tokens[1]"),
        ("/detokenize", {"tokens": [-1]}, "tokens[0]"),
        ("/detokenize", {"tokens": "12"}, "tokens"),
        ("/tokenize", {"prompt": "a", "messages": HELLO}, "messages"),
        ("/tokenize", {}, None),
        ("/tokenize", {"prompt": 5}, "prompt"),
    ],
)
def test_bad_tokenizer_requests_are_400(
    client: TestClient, path: str, body: dict[str, Any], param: str | None
) -> None:
    assert error_of(client.post(path, json=body), 400)["param"] == param
