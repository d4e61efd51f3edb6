"""Tool calls and reasoning over real HTTP, through the engine, checked with the openai SDK.

Models: tiny llamas whose weights are a bigram table (model_factory.build_scripted_llama), so
their greedy answer is a known tool call whatever the prompt, behind fixture chat templates
with tool support (Hermes/Qwen-style and Llama-3-style).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from starlette.testclient import TestClient
from transformers import AutoTokenizer

from mlx_engine_server.chat.prompt import chat_prompt
from mlx_engine_server.chat.tools import template_messages, template_tools
from mlx_engine_server.protocols.openai.types import ChatCompletionRequest

from ..conftest import LiveServer, run_live_server, start_engine
from ..model_factory import build_tiny_llama, scripted_model, use_chat_template

HERMES_ANSWER = '<tool_call>{"name":"lookup","arguments":{}}'
LLAMA3_ANSWER = '{"name":"lookup","parameters":{}}'
LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look something up.",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
    },
}
ASK = [{"role": "user", "content": "Look it up"}]


@pytest.fixture(scope="module")
def hermes_server(
    tmp_path_factory: pytest.TempPathFactory, smollm_dir: Path
) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("hermes") / "scripted-hermes"
    live = run_live_server(
        start_engine(scripted_model(root, smollm_dir, HERMES_ANSWER, "hermes_tools.jinja"))
    )
    yield live
    live.stop()


@pytest.fixture(scope="module")
def llama3_server(
    tmp_path_factory: pytest.TempPathFactory, smollm_dir: Path
) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("llama3") / "scripted-llama3"
    live = run_live_server(
        start_engine(scripted_model(root, smollm_dir, LLAMA3_ANSWER, "llama3_tools.jinja"))
    )
    yield live
    live.stop()


def sdk(live: LiveServer) -> OpenAI:
    return OpenAI(base_url=f"{live.base_url}/v1", api_key="unused", max_retries=0)


def stream_chunks(live: LiveServer, body: dict[str, Any]) -> list[ChatCompletionChunk]:
    chunks = []
    with httpx.stream("POST", f"{live.base_url}/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(ChatCompletionChunk.model_validate_json(line[len("data: ") :]))
    return chunks


@pytest.mark.parametrize(
    ("server", "template"), [("hermes_server", "hermes"), ("llama3_server", "llama3")]
)
def test_model_tool_call_becomes_message_tool_calls(
    request: pytest.FixtureRequest, server: str, template: str
) -> None:
    live: LiveServer = request.getfixturevalue(server)
    completion = sdk(live).chat.completions.create(
        model="m",
        messages=ASK,
        tools=[LOOKUP],
        temperature=0,
        max_tokens=40,  # type: ignore[list-item]
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls", template
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == "lookup"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {}  # type: ignore[union-attr]


def test_streamed_tool_call_deltas_as_openai_sends_them(hermes_server: LiveServer) -> None:
    body = {"messages": ASK, "tools": [LOOKUP], "temperature": 0, "max_tokens": 40, "stream": True}
    chunks = stream_chunks(hermes_server, body)
    deltas = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    assert not "".join(delta.content or "" for delta in deltas)  # no markup leaked
    tool_deltas = [call for delta in deltas for call in delta.tool_calls or []]
    first, *rest = tool_deltas
    assert (first.index, first.type) == (0, "function")
    assert first.id is not None
    assert first.id.startswith("call_")
    assert first.function is not None
    assert first.function.name == "lookup"
    assert first.function.arguments == ""
    assert all(delta.index == 0 and delta.id is None for delta in rest)
    assert json.loads("".join(d.function.arguments or "" for d in rest if d.function)) == {}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_sdk_stream_helper_accumulates_the_call(hermes_server: LiveServer) -> None:
    with sdk(hermes_server).chat.completions.stream(
        model="m",
        messages=ASK,
        tools=[LOOKUP],
        temperature=0,
        max_tokens=40,  # type: ignore[list-item]
    ) as stream:
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls or []
    assert call.function.name == "lookup"
    assert call.function.arguments == "{}"
    assert final.choices[0].finish_reason == "tool_calls"


def test_enable_thinking_reaches_the_template_and_the_answer_is_reasoning(
    hermes_server: LiveServer,
) -> None:
    """The template opens <think> when enable_thinking is set: all of the answer is thinking."""
    body = {
        "messages": ASK,
        "tools": [LOOKUP],
        "temperature": 0,
        "max_tokens": 40,
        "chat_template_kwargs": {"enable_thinking": True},
    }
    response = httpx.post(f"{hermes_server.base_url}/v1/chat/completions", json=body)
    completion = ChatCompletion.model_validate(response.json())
    message = response.json()["choices"][0]["message"]
    assert message["reasoning_content"] == message["reasoning"] == HERMES_ANSWER
    assert completion.choices[0].message.content == ""
    assert completion.choices[0].message.tool_calls is None
    assert completion.choices[0].finish_reason == "stop"
    chunks = stream_chunks(hermes_server, {**body, "stream": True})
    streamed = [chunk.choices[0].delta for chunk in chunks if chunk.choices]
    reasoning = "".join(getattr(delta, "reasoning_content", None) or "" for delta in streamed)
    assert reasoning == HERMES_ANSWER
    assert not "".join(delta.content or "" for delta in streamed)


def test_tool_choice_none_hides_tools_and_parses_nothing(hermes_server: LiveServer) -> None:
    client = sdk(hermes_server)
    shown = client.chat.completions.create(
        model="m",
        messages=ASK,
        tools=[LOOKUP],
        temperature=0,
        max_tokens=40,  # type: ignore[list-item]
    )
    hidden = client.chat.completions.create(
        model="m",
        messages=ASK,
        tools=[LOOKUP],
        tool_choice="none",
        temperature=0,
        max_tokens=40,  # type: ignore[list-item]
    )
    assert hidden.choices[0].message.content == HERMES_ANSWER
    assert hidden.choices[0].finish_reason == "stop"
    assert shown.usage is not None
    assert hidden.usage is not None
    assert hidden.usage.prompt_tokens < shown.usage.prompt_tokens - 20


def test_a_tool_round_trip_goes_back_through_the_template(hermes_server: LiveServer) -> None:
    client = sdk(hermes_server)
    first = client.chat.completions.create(
        model="m",
        messages=ASK,
        tools=[LOOKUP],
        temperature=0,
        max_tokens=40,  # type: ignore[list-item]
    )
    call = (first.choices[0].message.tool_calls or [])[0]
    history = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    second = client.chat.completions.create(
        model="m",
        messages=history,
        tools=[LOOKUP],
        temperature=0,
        max_tokens=40,  # type: ignore[arg-type,list-item]
    )
    assert second.choices[0].finish_reason == "tool_calls"
    assert second.usage is not None
    assert first.usage is not None
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 10


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (
            "hermes_tools.jinja",
            [
                '"name": "lookup"',
                "<think>\nfirst I look\n</think>",
                '<tool_call>\n{"name": "lookup", "arguments": {"q": "weather"}}\n</tool_call>',
                "<tool_response>\nsunny\n</tool_response>",
            ],
        ),
        (
            "llama3_tools.jinja",
            [
                '"name": "lookup"',
                '{"name": "lookup", "parameters": {"q": "weather"}}',
                "<|start_header_id|>ipython<|end_header_id|>\n\nsunny",
            ],
        ),
    ],
)
def test_templates_render_tools_calls_results_and_thinking(
    tmp_path: Path, smollm_dir: Path, template: str, expected: list[str]
) -> None:
    model = build_tiny_llama(tmp_path / "m", smollm_dir)
    tokenizer = AutoTokenizer.from_pretrained(use_chat_template(model, template))
    body = ChatCompletionRequest.model_validate(
        {
            "messages": [
                *ASK,
                {
                    "role": "assistant",
                    "content": None,
                    "reasoning": "first I look",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "lookup", "arguments": '{"q": "weather"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            ],
            "tools": [LOOKUP],
        }
    )
    text = chat_prompt(tokenizer, template_messages(list(body.messages)), template_tools(body)).text
    for piece in expected:
        assert piece in text


CALL = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {"tools": [LOOKUP], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [LOOKUP, LOOKUP]}, "tools[1].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name"}}]},
            "tools[0].function.name",
        ),
        ({"tools": []}, "tools"),
        ({"tool_choice": "sometimes", "tools": [LOOKUP]}, "tool_choice"),
        ({"messages": [*ASK, {"role": "tool", "content": "x"}]}, "messages[1].tool_call_id"),
        (
            {"messages": [*ASK, {"role": "tool", "content": "x", "tool_call_id": "call_9"}]},
            "messages[1].tool_call_id",
        ),
        (
            {"messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}]},
            "messages[0].tool_calls",
        ),
        (
            {
                "messages": [
                    *ASK,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {**CALL, "function": {"name": "lookup", "arguments": "[1]"}}
                        ],
                    },
                ]
            },
            "messages[1].tool_calls[0].function.arguments",
        ),
        ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs.tokenize"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ],
)
def test_bad_tool_requests_are_400_naming_the_parameter(
    client: TestClient, fields: dict[str, Any], param: str
) -> None:
    body = {"messages": ASK, "max_tokens": 4, **fields}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_tool_messages_answering_earlier_calls_are_accepted(client: TestClient) -> None:
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [CALL], "reasoning_content": "hm"},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    response = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
    assert response.status_code == 200, response.text
    ChatCompletion.model_validate(response.json())


@pytest.fixture(scope="module")
def random_hermes_server(
    tmp_path_factory: pytest.TempPathFactory, smollm_dir: Path
) -> Iterator[LiveServer]:
    model = build_tiny_llama(tmp_path_factory.mktemp("rnd") / "random-hermes", smollm_dir)
    live = run_live_server(start_engine(use_chat_template(model, "hermes_tools.jinja")))
    yield live
    live.stop()


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_forced_tool_choice_gives_a_schema_valid_call_even_from_random_weights(
    random_hermes_server: LiveServer, choice: Any
) -> None:
    completion = sdk(random_hermes_server).chat.completions.create(
        model="m",
        messages=ASK,
        tools=[WEATHER],
        tool_choice=choice,
        parallel_tool_calls=False,
        temperature=1.0,
        seed=3,
        # Random weights pick among the allowed tokens at random, often one character at a time.
        max_tokens=150,  # type: ignore[list-item,arg-type]
    )
    assert completion.choices[0].finish_reason == "tool_calls", completion.choices[0].message
    (call,) = completion.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")  # type: ignore[union-attr]
