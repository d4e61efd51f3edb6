"""Anthropic Messages over real HTTP, with the official `anthropic` SDK as the client.

The answers are checked against the OpenAI chat route for the same conversation: one pipeline,
two protocols. Tool calls come from a scripted model (tests/model_factory.build_scripted_llama)
whose greedy answer is a Hermes-style call of `lookup`, whatever the prompt.
"""

from __future__ import annotations

import json
from typing import Any

import httpx2 as httpx
import pytest
from anthropic import Anthropic, BadRequestError, NotFoundError
from anthropic.types import (
    Message,
    ModelInfo,
    RawMessageStreamEvent,
    TextBlock,
    ThinkingBlock,
    ToolUseBlock,
)
from pydantic import TypeAdapter
from starlette.applications import Starlette
from starlette.testclient import TestClient

from mlx_engine_server.errors import GenerationTimeoutError, InternalError, OverloadedError
from mlx_engine_server.http.app import ServerOptions, create_app
from mlx_engine_server.http.errors import error_response
from mlx_engine_server.protocols.anthropic.render import ANTHROPIC

from ..conftest import (
    HERMES_ANSWER,
    TINY_CONTEXT_WINDOW,
    LiveServer,
    chat_on_live,
    close_after_test,
)

ASK = [{"role": "user", "content": "Look it up"}]
LOOKUP = {
    "name": "lookup",
    "description": "Look something up.",
    "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}},
}
LOOKUP_FOR_CHAT = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look something up.",
        "parameters": LOOKUP["input_schema"],
    },
}
GREEDY = {"temperature": 0}  # the SDK no longer types sampling fields; the API still takes them
STREAM_EVENTS: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)


def sdk(live: LiveServer) -> Anthropic:
    client = Anthropic(base_url=live.base_url, api_key="unused", max_retries=0)
    return close_after_test(client)


def sse_events(live: LiveServer, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of a raw stream, without the SDK in between."""
    events = []
    name = ""
    with httpx.stream("POST", f"{live.base_url}/v1/messages", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: ") :])))
    return events


def test_a_text_turn_is_the_chat_routes_answer(tiny_server: LiveServer) -> None:
    raw = sdk(tiny_server).messages.with_raw_response.create(
        model="claude-sonnet-5",
        max_tokens=6,
        system="Be brief.",
        messages=[{"role": "user", "content": "Hello"}],
        extra_body=GREEDY,
    )
    message = Message.model_validate(raw.http_response.json())  # strict, unlike the SDK's parse
    reference = chat_on_live(
        tiny_server,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_tokens=6,
        temperature=0,
    )
    (block,) = message.content
    assert isinstance(block, TextBlock)
    assert block.text == reference["choices"][0]["message"]["content"]
    finish = reference["choices"][0]["finish_reason"]
    assert message.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[finish]
    usage = message.usage
    assert usage.output_tokens == reference["usage"]["completion_tokens"]
    prompt_tokens = reference["usage"]["prompt_tokens"]
    assert usage.input_tokens + (usage.cache_read_input_tokens or 0) == prompt_tokens
    assert message.id.startswith("msg_")


def test_the_stream_is_anthropics_event_sequence(tiny_server: LiveServer) -> None:
    body = {"model": "c", "max_tokens": 4, "messages": ASK, "stream": True, **GREEDY}
    events = sse_events(tiny_server, body)
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    for name, data in events:
        assert data["type"] == name
        if name != "ping":
            STREAM_EVENTS.validate_python(data)
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "max_tokens"
    assert delta["usage"]["output_tokens"] == 4
    whole = sdk(tiny_server).messages.create(
        model="c", max_tokens=4, messages=ASK, extra_body=GREEDY
    )
    streamed_text = "".join(data["delta"]["text"] for name, data in events[3:-3])
    assert [streamed_text] == [block.text for block in whole.content if block.type == "text"]


def test_the_sdk_stream_helper_accumulates_the_message(tiny_server: LiveServer) -> None:
    client = sdk(tiny_server)
    whole = client.messages.create(model="c", max_tokens=5, messages=ASK, extra_body=GREEDY)
    with client.messages.stream(model="c", max_tokens=5, messages=ASK, extra_body=GREEDY) as stream:
        final = stream.get_final_message()
    assert [(block.type, getattr(block, "text", None)) for block in final.content] == [
        (block.type, getattr(block, "text", None)) for block in whole.content
    ]
    assert final.stop_reason == whole.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 5
    total = final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0)
    assert total == whole.usage.input_tokens + (whole.usage.cache_read_input_tokens or 0)
    assert final.usage.cache_read_input_tokens  # the same prompt again: read from the cache


def test_count_tokens_equals_the_input_of_a_call_and_the_chat_prompt(
    hermes_agent_server: LiveServer,
) -> None:
    client = sdk(hermes_agent_server)
    conversation = {"system": "You look things up.", "messages": ASK, "tools": [LOOKUP]}
    counted = client.messages.count_tokens(model="claude-haiku-5-5", **conversation)  # type: ignore[arg-type]
    message = client.messages.create(
        model="claude-haiku-5-5",
        max_tokens=40,
        extra_body=GREEDY,
        **conversation,  # type: ignore[arg-type]
    )
    usage = message.usage
    assert counted.input_tokens == usage.input_tokens + (usage.cache_read_input_tokens or 0)
    reference = chat_on_live(
        hermes_agent_server,
        messages=[{"role": "system", "content": "You look things up."}, *ASK],
        tools=[LOOKUP_FOR_CHAT],
        max_tokens=1,
    )
    assert counted.input_tokens == reference["usage"]["prompt_tokens"]


def test_a_tool_use_and_its_tool_result_follow_up(hermes_agent_server: LiveServer) -> None:
    client = sdk(hermes_agent_server)
    first = client.messages.create(
        model="c", max_tokens=40, messages=ASK, tools=[LOOKUP], extra_body=GREEDY
    )
    Message.model_validate(first.model_dump())
    (call,) = first.content
    assert isinstance(call, ToolUseBlock)
    assert (call.name, call.input) == ("lookup", {})
    assert call.id.startswith("toolu_")
    assert first.stop_reason == "tool_use"
    history: list[Any] = [
        *ASK,
        {"role": "assistant", "content": [call.model_dump(exclude_none=True)]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}],
        },
    ]
    second = client.messages.create(
        model="c", max_tokens=40, messages=history, tools=[LOOKUP], extra_body=GREEDY
    )
    assert second.stop_reason == "tool_use"
    counted = client.messages.count_tokens(model="c", messages=history, tools=[LOOKUP])
    chat_history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": "lookup", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    reference = chat_on_live(
        hermes_agent_server, messages=chat_history, tools=[LOOKUP_FOR_CHAT], max_tokens=1
    )
    assert counted.input_tokens == reference["usage"]["prompt_tokens"]
    first_total = first.usage.input_tokens + (first.usage.cache_read_input_tokens or 0)
    assert counted.input_tokens > first_total + 10


def test_a_streamed_tool_use(hermes_agent_server: LiveServer) -> None:
    body = {"model": "c", "max_tokens": 40, "messages": ASK, "tools": [LOOKUP], "stream": True}
    body.update(GREEDY)
    events = sse_events(hermes_agent_server, body)
    (start,) = [data for name, data in events if name == "content_block_start"]
    assert start["content_block"]["type"] == "tool_use"
    assert start["content_block"]["input"] == {}
    deltas = [data["delta"] for name, data in events if name == "content_block_delta"]
    assert [delta["type"] for delta in deltas] == ["input_json_delta"]
    with sdk(hermes_agent_server).messages.stream(
        model="c", max_tokens=40, messages=ASK, tools=[LOOKUP], extra_body=GREEDY
    ) as stream:
        final = stream.get_final_message()
    (call,) = final.content
    assert isinstance(call, ToolUseBlock)
    assert (call.name, call.input, final.stop_reason) == ("lookup", {}, "tool_use")


def test_thinking_comes_back_as_thinking_blocks(hermes_agent_server: LiveServer) -> None:
    """The fixture template opens <think> when thinking is on: all of the answer is thinking."""
    client = sdk(hermes_agent_server)
    request: dict[str, Any] = {
        "model": "c",
        "max_tokens": 40,
        "messages": ASK,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "extra_body": GREEDY,
    }
    message = client.messages.create(**request)
    assert message.content == [ThinkingBlock(type="thinking", thinking=HERMES_ANSWER, signature="")]
    assert message.stop_reason == "end_turn"
    with client.messages.stream(**request) as stream:
        kinds = [event.delta.type for event in stream if event.type == "content_block_delta"]
        final = stream.get_final_message()
    assert set(kinds) == {"thinking_delta"}
    assert final.content == message.content
    omitted = client.messages.create(
        **{**request, "thinking": {"type": "enabled", "budget_tokens": 1024, "display": "omitted"}}
    )
    assert omitted.content == [ThinkingBlock(type="thinking", thinking="", signature="")]
    plain = client.messages.create(**{**request, "thinking": {"type": "disabled"}})
    assert [block.type for block in plain.content] == ["text"]


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "get_weather"}])
def test_a_forced_tool_choice_gives_a_schema_valid_call(
    random_hermes_agent_server: LiveServer, choice: dict[str, Any]
) -> None:
    weather = {
        "name": "get_weather",
        "input_schema": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    }
    message = sdk(random_hermes_agent_server).messages.create(
        model="c",
        max_tokens=150,
        messages=ASK,
        tools=[weather],  # type: ignore[list-item]
        tool_choice={**choice, "disable_parallel_tool_use": True},  # type: ignore[typeddict-item]
        extra_body=GREEDY,
    )
    assert message.stop_reason == "tool_use", message.content
    (call,) = message.content
    assert isinstance(call, ToolUseBlock)
    assert call.name == "get_weather"
    assert call.input["city"] in ("Paris", "Rome")


def test_a_stop_sequence_ends_the_turn_and_is_named(hermes_agent_server: LiveServer) -> None:
    message = sdk(hermes_agent_server).messages.create(
        model="c", max_tokens=40, messages=ASK, stop_sequences=['"lookup"'], extra_body=GREEDY
    )
    assert [block.model_dump() for block in message.content] == [
        {"type": "text", "text": '<tool_call>{"name":', "citations": None}
    ]
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", '"lookup"')


IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"temperature": 1.5}, "temperature"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, IMAGE]}]},
            "messages[0].content[1]",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "tool_result", "tool_use_id": "toolu_1"}],
                    }
                ]
            },
            "messages[0].content[0].tool_use_id",
        ),
        ({"messages": [*ASK, {"role": "assistant", "content": "Sure"}]}, "messages[1]"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
        ({"tool_choice": {"type": "any"}}, "tool_choice"),
        ({"tool_choice": {"type": "tool"}}, "tool_choice"),
        ({"messages": [{"role": "user", "content": [{"type": "server_tool_use"}]}]}, "messages[0]"),
        ({"max_tokens": 10_000}, "context length"),
        ({"stop_sequences": ["s"] * 17}, "stop_sequences"),
        ({"mcp_servers": [{"type": "url", "url": "https://example.com"}]}, "mcp_servers"),
    ],
)
def test_bad_requests_are_anthropic_shaped_400s(
    client: TestClient, fields: dict[str, Any], named: str
) -> None:
    body = {"model": "c", "max_tokens": 4, "messages": ASK, **fields}
    body = {key: value for key, value in body.items() if value is not None}
    response = client.post("/v1/messages", json=body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    assert named in error["error"]["message"]


def test_other_errors_keep_anthropics_shape(client: TestClient, tiny_app: Starlette) -> None:
    bad_json = client.post(
        "/v1/messages", content=b"{", headers={"content-type": "application/json"}
    )
    assert (bad_json.status_code, bad_json.json()["type"]) == (400, "error")
    count = client.post("/v1/messages/count_tokens", json={"model": "c"})
    assert count.json()["error"]["type"] == "invalid_request_error"
    wrong_method = client.get("/v1/messages")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["type"] == "invalid_request_error"
    assert wrong_method.headers["allow"] == "POST"
    mistyped = client.post("/v1/messages/batches", json={})
    assert (mistyped.status_code, mistyped.json()["type"]) == (404, "error")
    assert mistyped.json()["error"]["type"] == "not_found_error"
    assert client.post("/v1/messagesx", json={}).json()["error"]["code"] == "unknown_url"
    big_headers = client.post("/v1/messages", json={}, headers={"x-pad": "a" * 40_000})
    assert big_headers.status_code == 431
    assert big_headers.json()["error"]["type"] == "request_too_large"  # not api_error (a 5xx's)
    strict = TestClient(create_app(tiny_app.state.engine, ServerOptions(strict_model_name=True)))
    unknown = strict.post(
        "/v1/messages", json={"model": "claude-x", "max_tokens": 2, "messages": ASK}
    )
    assert unknown.status_code == 404
    assert unknown.json()["error"]["type"] == "not_found_error"
    # The OpenAI routes keep OpenAI's shape.
    assert "param" in client.post("/v1/chat/completions", json={}).json()["error"]


def test_the_sdk_raises_its_own_error_types(tiny_server: LiveServer) -> None:
    with pytest.raises(BadRequestError) as caught:
        sdk(tiny_server).messages.create(
            model="c",
            max_tokens=4,
            messages=[{"role": "user", "content": [IMAGE]}],  # type: ignore[list-item]
        )
    assert caught.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]


def test_the_sdk_reads_the_request_id_of_answers_and_errors(tiny_server: LiveServer) -> None:
    """Anthropic's SDK reads `request-id` (OpenAI's reads `x-request-id`): the same id in both."""
    client = sdk(tiny_server)
    raw = client.messages.with_raw_response.create(model="c", max_tokens=1, messages=ASK)
    assert raw.request_id is not None
    assert raw.request_id == raw.headers["x-request-id"]
    with pytest.raises(BadRequestError) as refused:
        client.messages.create(model="c", max_tokens=1, messages=[])
    assert refused.value.request_id is not None
    assert refused.value.request_id == refused.value.response.headers["x-request-id"]


def test_the_sdk_lists_and_retrieves_the_model_in_anthropics_shape(
    tiny_server: LiveServer,
) -> None:
    """/v1/models is both APIs' path: the Anthropic SDK's `anthropic-version` header picks its
    shape; other clients keep OpenAI's."""
    client = sdk(tiny_server)
    page = client.models.with_raw_response.list().http_response.json()
    (card,) = page["data"]
    model = ModelInfo.model_validate(card)  # strict, unlike the SDK's parse
    assert (model.id, model.type, model.max_input_tokens) == (
        "tiny-llama",
        "model",
        TINY_CONTEXT_WINDOW,
    )
    assert (page["has_more"], page["first_id"], page["last_id"]) == (False, model.id, model.id)
    assert [listed.id for listed in client.models.list()] == [model.id]
    assert client.models.retrieve(model.id) == model
    with pytest.raises(NotFoundError) as missing:
        client.models.retrieve("claude-sonnet-5")
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    openai_listing = httpx.get(f"{tiny_server.base_url}/v1/models").json()
    assert openai_listing["data"][0]["object"] == "model"
    assert "display_name" not in openai_listing["data"][0]


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (OverloadedError("queue full", retry_after_s=1), 529, "overloaded_error"),
        (GenerationTimeoutError("too slow"), 504, "timeout_error"),
        (InternalError("bug"), 500, "api_error"),
    ],
)
def test_server_side_errors_map_to_anthropics_types(error: Any, status: int, kind: str) -> None:
    response = error_response(error, ANTHROPIC)
    assert response.status_code == status
    assert json.loads(bytes(response.body))["error"]["type"] == kind
    if status == 529:
        assert response.headers["retry-after"] == "1"  # the SDK waits as told before retrying
    if status == 500:
        assert response.headers["x-should-retry"] == "false"


@pytest.mark.smollm
def test_real_weights_answer_through_the_anthropic_sdk(smollm_server: LiveServer) -> None:
    message = sdk(smollm_server).messages.create(
        model="claude-sonnet-5",
        max_tokens=20,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        extra_body=GREEDY,
    )
    assert "Paris" in "".join(block.text for block in message.content if block.type == "text")


def test_cached_prompt_tokens_are_reported_in_a_header_as_in_usage(
    fresh_client: TestClient,
) -> None:
    body = {"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "The sea?"}]}
    fresh_client.post("/v1/messages", json=body)
    again = fresh_client.post("/v1/messages", json=body)
    cached = again.json()["usage"]["cache_read_input_tokens"]
    assert cached > 0
    assert again.headers["x-mlx-cached-tokens"] == str(cached)
