"""OpenAI Responses (stateless) over real HTTP, with the official `openai` SDK as the client.

As for Anthropic Messages, answers are checked against the chat route for the same
conversation; tool calls come from the scripted Hermes-style model (tests/conftest.py).
"""

from __future__ import annotations

import json
from typing import Any, Literal

import httpx2 as httpx
import pytest
from openai import OpenAI
from openai.types.responses import (
    Response,
    ResponseFunctionToolCall,
    ResponseReasoningItem,
    ResponseStreamEvent,
    response_create_params,
)
from pydantic import BaseModel, TypeAdapter
from starlette.testclient import TestClient

from ..conftest import HERMES_ANSWER, LiveServer, chat_on_live, close_after_test

ASK = [{"role": "user", "content": "Look it up"}]
LOOKUP = {
    "type": "function",
    "name": "lookup",
    "description": "Look something up.",
    "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
    "strict": False,
}
LOOKUP_FOR_CHAT = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look something up.",
        "parameters": LOOKUP["parameters"],
        "strict": False,
    },
}
STREAM_EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


def sdk(live: LiveServer) -> OpenAI:
    client = OpenAI(base_url=f"{live.base_url}/v1", api_key="unused", max_retries=0)
    return close_after_test(client)


def post(live: LiveServer, **fields: Any) -> Response:
    """A non-streamed response, validated strictly (the SDK itself only constructs)."""
    raw = httpx.post(f"{live.base_url}/v1/responses", json=fields)
    assert raw.status_code == 200, raw.text
    return Response.model_validate(raw.json())


def test_a_text_turn_is_the_chat_routes_answer(tiny_server: LiveServer) -> None:
    request = {"model": "m", "input": "Hello", "instructions": "Be brief."}
    post(tiny_server, **request, max_output_tokens=6, temperature=0)
    response = post(tiny_server, **request, max_output_tokens=6, temperature=0)  # cached now
    reference = chat_on_live(
        tiny_server,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_tokens=6,
        temperature=0,
    )
    assert response.output_text == reference["choices"][0]["message"]["content"]
    assert response.status == "incomplete"  # six tokens of random weights never end a turn
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None
    assert response.usage.input_tokens == reference["usage"]["prompt_tokens"]
    assert response.usage.output_tokens == 6
    assert response.usage.input_tokens_details.cached_tokens > 0  # asked twice
    assert (response.store, response.instructions, response.max_output_tokens) == (
        True,  # stored by default, as on OpenAI (tests/protocols/test_stored_responses.py)
        "Be brief.",
        6,
    )
    via_sdk = sdk(tiny_server).responses.create(
        model="m",
        input=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_output_tokens=6,
        temperature=0,
    )
    assert via_sdk.output_text == response.output_text


def test_a_completed_stream_through_the_sdk_helper(hermes_agent_server: LiveServer) -> None:
    with sdk(hermes_agent_server).responses.stream(
        model="m", input=ASK, max_output_tokens=40, temperature=0
    ) as stream:
        types = [event.type for event in stream]
        final = stream.get_final_response()
    assert final.output_text == HERMES_ANSWER  # no tools offered: the call is plain text
    assert final.status == "completed"
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert "response.output_text.delta" in types


def test_raw_stream_events_are_numbered_and_valid(tiny_server: LiveServer) -> None:
    with sdk(tiny_server).responses.create(
        model="m", input="Hi", max_output_tokens=3, temperature=0, stream=True
    ) as stream:
        events = list(stream)
    assert [event.sequence_number for event in events] == list(range(len(events)))
    for event in events:
        STREAM_EVENTS.validate_python(event.model_dump())
    last = events[-1]
    assert last.type == "response.incomplete"
    assert last.response.usage is not None
    assert last.response.usage.output_tokens == 3
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert "".join(deltas) == last.response.output_text


def logprob_rows(entries: Any) -> list[tuple[str, float, list[str]]]:
    """(token, logprob, the top tokens) of each entry: what a stream and a whole answer share."""
    return [
        (entry.token, entry.logprob, [top.token for top in entry.top_logprobs or ()])
        for entry in entries
    ]


def test_output_text_logprobs_whole_and_streamed(tiny_server: LiveServer) -> None:
    request: dict[str, Any] = {
        "model": "m",
        "input": "Hello",
        "max_output_tokens": 5,
        "temperature": 0,
        "top_logprobs": 3,
        "include": ["message.output_text.logprobs"],
    }
    post(tiny_server, **request)  # the prompt is cached from here on, for every answer below
    whole = post(tiny_server, **request)
    assert whole.usage is not None
    (message,) = whole.output
    assert message.type == "message"
    (part,) = message.content
    assert part.type == "output_text"
    assert part.logprobs is not None
    assert len(part.logprobs) == whole.usage.output_tokens == 5
    for entry in part.logprobs:
        assert len(entry.top_logprobs) == 3
        assert entry.token == bytes(entry.bytes).decode("utf-8", errors="replace")
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy: the top
    chat = chat_on_live(
        tiny_server,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    assert [entry.token for entry in part.logprobs] == [
        entry["token"] for entry in chat["choices"][0]["logprobs"]["content"]
    ]
    events = list(sdk(tiny_server).responses.create(stream=True, **request))
    for event in events:
        STREAM_EVENTS.validate_python(event.model_dump())
    streamed = [
        entry
        for event in events
        if event.type == "response.output_text.delta"
        for entry in event.logprobs
    ]
    (done,) = [event for event in events if event.type == "response.output_text.done"]
    expected = logprob_rows(part.logprobs)
    assert logprob_rows(streamed) == expected
    assert logprob_rows(done.logprobs) == expected
    (final_message,) = events[-1].response.output  # type: ignore[union-attr]
    assert final_message.content[0].logprobs == part.logprobs  # type: ignore[union-attr]
    plain = post(tiny_server, **{**request, "top_logprobs": None, "include": None})
    assert plain.output[0].content[0].logprobs == []  # type: ignore[union-attr]


def test_a_function_call_and_its_output_follow_up(hermes_agent_server: LiveServer) -> None:
    client = sdk(hermes_agent_server)
    first = client.responses.create(
        model="m", input=ASK, tools=[LOOKUP], temperature=0, max_output_tokens=40
    )
    (call,) = first.output
    assert isinstance(call, ResponseFunctionToolCall)
    assert (call.name, call.arguments, call.status) == ("lookup", "{}", "completed")
    assert call.call_id.startswith("call_")
    assert first.status == "completed"
    follow_up: list[Any] = [
        *ASK,
        call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
    ]
    second = client.responses.create(
        model="m", input=follow_up, tools=[LOOKUP], temperature=0, max_output_tokens=40
    )
    assert [item.type for item in second.output] == ["function_call"]
    reference = chat_on_live(
        hermes_agent_server,
        messages=[
            *ASK,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call.call_id,
                        "type": "function",
                        "function": {"name": "lookup", "arguments": "{}"},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call.call_id, "content": "sunny"},
        ],
        tools=[LOOKUP_FOR_CHAT],
        max_tokens=1,
    )
    assert second.usage is not None
    assert second.usage.input_tokens == reference["usage"]["prompt_tokens"]


def test_a_streamed_function_call(hermes_agent_server: LiveServer) -> None:
    with sdk(hermes_agent_server).responses.stream(
        model="m", input=ASK, tools=[LOOKUP], temperature=0, max_output_tokens=40
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    (call,) = final.output
    assert isinstance(call, ResponseFunctionToolCall)
    assert (call.name, call.arguments) == ("lookup", "{}")
    arguments = [event for event in events if event.type.startswith("response.function_call")]
    assert [event.type for event in arguments] == [
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
    ]
    assert not [event for event in events if event.type == "response.output_text.delta"]


def test_reasoning_comes_back_as_a_reasoning_item(hermes_agent_server: LiveServer) -> None:
    """An effort turns thinking on: the fixture template then opens <think>."""
    client = sdk(hermes_agent_server)
    request: dict[str, Any] = {
        "model": "m",
        "input": ASK,
        "reasoning": {"effort": "low"},
        "temperature": 0,
        "max_output_tokens": 40,
    }
    response = client.responses.create(**request)
    (item,) = response.output
    assert isinstance(item, ResponseReasoningItem)
    assert [part.text for part in item.content or []] == [HERMES_ANSWER]
    assert response.usage is not None
    assert 0 < response.usage.output_tokens_details.reasoning_tokens <= 40
    with client.responses.stream(**request) as stream:
        types = {event.type for event in stream}
        final = stream.get_final_response()
    assert "response.reasoning_text.delta" in types
    assert final.output[0].model_dump() == item.model_dump() | {"id": final.output[0].id}
    history = [*ASK, item.model_dump(exclude_none=True), {"role": "user", "content": "And?"}]
    again = client.responses.create(**{**request, "input": history, "max_output_tokens": 1})
    shorter = client.responses.create(
        **{**request, "input": [*ASK, {"role": "user", "content": "And?"}], "max_output_tokens": 1}
    )
    assert again.usage is not None
    assert shorter.usage is not None
    assert again.usage.input_tokens > shorter.usage.input_tokens  # the reasoning was rendered


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_weather"}])
def test_a_forced_tool_choice_gives_a_schema_valid_call(
    random_hermes_agent_server: LiveServer, choice: Any
) -> None:
    weather = {
        "type": "function",
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "strict": True,
    }
    response = sdk(random_hermes_agent_server).responses.create(
        model="m",
        input=ASK,
        tools=[weather],  # type: ignore[list-item]
        tool_choice=choice,
        parallel_tool_calls=False,
        temperature=0,
        max_output_tokens=150,
    )
    (call,) = response.output
    assert isinstance(call, ResponseFunctionToolCall), response.output
    assert call.name == "get_weather"
    assert json.loads(call.arguments)["city"] in ("Paris", "Rome")


class City(BaseModel):
    city: Literal["Paris", "Rome"]


def test_text_format_json_schema_goes_through_structured_output(tiny_server: LiveServer) -> None:
    parsed = sdk(tiny_server).responses.parse(
        model="m", input="Name a city.", text_format=City, temperature=0, max_output_tokens=60
    )
    assert parsed.status == "completed"
    assert isinstance(parsed.output_parsed, City)
    assert parsed.text is not None
    assert parsed.text.format is not None
    assert parsed.text.format.type == "json_schema"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"store": "yes"}, "store"),
        ({"previous_response_id": ""}, "previous_response_id"),
        ({"conversation": {"name": "conv_1"}}, "conversation"),
        ({"background": True}, "background"),
        ({"include": ["file_search_call.results"]}, "include"),
        ({"truncation": "auto"}, "truncation"),
        ({"input": None}, "input"),
        ({"input": []}, "input"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0].image_url",  # this model reads no images
        ),
        (
            {
                "instructions": "Be brief.",
                "input": [
                    {"role": "user", "content": "Hi"},
                    {"role": "user", "content": [{"type": "input_image", "image_url": "x"}]},
                ],
            },
            "input[1].content[0].image_url",  # chat message 2 is input item 1
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input[0].content[0]",
        ),
        (
            {"input": [{"type": "function_call_output", "call_id": "call_9", "output": "x"}]},
            "input[0].call_id",
        ),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [{"type": "function", "name": "bad name"}]}, "tools[0].name"),
        ({"input": [{"role": "user"}]}, "input[0].content"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_text"}]}]},
            "input[0].content[0].text",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}},
            "tool_choice.type",
        ),
        (
            {
                "text": {
                    "format": {"type": "json_schema", "name": "x", "schema": {"not": {}}},
                }
            },
            "text.format.schema",
        ),
        ({"max_output_tokens": 10_000}, "max_output_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"reasoning": {"effort": "extreme"}}, "reasoning.effort"),
        ({"top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_bad_requests_are_openai_shaped_400s_naming_the_field(
    client: TestClient, fields: dict[str, Any], param: str
) -> None:
    body = {"model": "m", "input": "Hi", "max_output_tokens": 4, **fields}
    body = {key: value for key, value in body.items() if value is not None}
    response = client.post("/v1/responses", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error


# Required, or the request's own length and sampling (null: their defaults, another answer).
NOT_NULLED = {"input", "max_output_tokens", "temperature"}
NULLED_FIELDS = sorted(
    set(response_create_params.ResponseCreateParamsBase.__annotations__) - NOT_NULLED | {"stream"}
)


@pytest.mark.parametrize("field", NULLED_FIELDS)
def test_null_is_the_default_for_every_field(client: TestClient, field: str) -> None:
    """OpenAI types every optional field `... or null`: null means the default."""
    body = {"model": "m", "input": "Hi", "max_output_tokens": 2, "temperature": 0}
    plain = client.post("/v1/responses", json=body).json()
    nulled = client.post("/v1/responses", json={**body, field: None})
    assert nulled.status_code == 200, nulled.text
    assert nulled.json()["output"][0]["content"] == plain["output"][0]["content"]


@pytest.mark.smollm
def test_real_weights_answer_through_the_responses_api(smollm_server: LiveServer) -> None:
    response = sdk(smollm_server).responses.create(
        model="SmolLM2", input="What is the capital of France?", max_output_tokens=20, temperature=0
    )
    assert "Paris" in response.output_text


def test_cached_prompt_tokens_are_reported_in_a_header_as_in_usage(
    fresh_client: TestClient,
) -> None:
    body = {"model": "m", "input": "Tell me about the sea, please.", "max_output_tokens": 3}
    fresh_client.post("/v1/responses", json=body)
    again = fresh_client.post("/v1/responses", json=body)
    cached = again.json()["usage"]["input_tokens_details"]["cached_tokens"]
    assert cached > 0
    assert again.headers["x-mlx-cached-tokens"] == str(cached)
