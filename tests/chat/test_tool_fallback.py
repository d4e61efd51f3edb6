"""Tools on any model, and tools beside structured output, over real HTTP with the SDKs.

The tiny random model and SmolLM2 share SmolLM2's chat template, which renders no tools: they get
the generic fallback (docs/tool-fallback.md). Scripted models (model_factory.build_scripted_llama)
answer a known text whatever the prompt, so what the grammar lets through is known.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2 as httpx
import pytest
from openai import OpenAI
from starlette.testclient import TestClient
from transformers import AutoTokenizer

from mlx_engine_server.chat.plan import chat_formats, plan_chat
from mlx_engine_server.chat.tool_fallback import INSTRUCTIONS
from mlx_engine_server.http.app import ServerOptions, create_app
from mlx_engine_server.protocols.openai.types import ChatCompletionRequest

from ..conftest import LiveServer, brace_model, close_after_test, run_live_server, start_engine

CITY = {"type": "string", "enum": ["Paris", "Rome"]}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": CITY},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
PING = {"type": "function", "function": {"name": "ping", "parameters": NO_ARGUMENTS}}
GREEDY = {"temperature": 0}  # the anthropic SDK no longer types sampling fields
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SKY = {
    "type": "json_schema",
    "json_schema": {
        "name": "sky",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"sky": {"type": "string", "enum": ["sunny", "rainy"]}},
            "required": ["sky"],
            "additionalProperties": False,
        },
    },
}


def openai_sdk(live: LiveServer) -> OpenAI:
    return close_after_test(OpenAI(base_url=f"{live.base_url}/v1", api_key="x", max_retries=0))


def anthropic_sdk(live: LiveServer) -> anthropic.Anthropic:
    return close_after_test(anthropic.Anthropic(base_url=live.base_url, api_key="x", max_retries=0))


def weather_city(arguments: str) -> str:
    city: str = json.loads(arguments)["city"]
    return city


# --- 1. the fallback ---------------------------------------------------------------------------


def test_the_fallback_writes_tools_and_earlier_calls_into_the_prompt(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    formats = chat_formats(tokenizer, "auto", "auto")
    assert formats.tool_fallback
    calls_to = ("Rome", "Paris")
    calls = [
        {
            "id": f"c{city}",
            "type": "function",
            "function": {"name": "get_weather", "arguments": f'{{"city": "{city}"}}'},
        }
        for city in calls_to
    ]
    messages = [
        {"role": "system", "content": "Be brief."},
        *ASK,
        {"role": "assistant", "content": "Let me see.", "tool_calls": calls},
        {"role": "tool", "tool_call_id": "cRome", "content": "Rain."},
        {"role": "tool", "tool_call_id": "cParis", "content": "Sun."},
    ]
    body = ChatCompletionRequest.model_validate({"messages": messages, "tools": [WEATHER]})
    text = plan_chat(tokenizer, formats, body).prompt_text
    system = text.split("<|im_end|>")[0]
    assert '"name": "get_weather", "description": "The weather in a city."' in system
    assert system.endswith("Be brief.")
    rome, paris = (f'{{"name": "get_weather", "arguments": {{"city": "{c}"}}}}' for c in calls_to)
    written = f'{{"tool_calls": [{rome}, {paris}]}}'
    assert f"<|im_start|>assistant\nLet me see.\n{written}<|im_end|>" in text
    results = [
        '{"tool_response": {"name": "get_weather", "content": "Rain."}}',
        '{"tool_response": {"name": "get_weather", "content": "Sun."}}',
    ]
    assert "<|im_start|>user\n" + "\n".join(results) + "<|im_end|>" in text  # one user turn
    assert not chat_formats(tokenizer, "none", "auto").tool_fallback


def test_the_log_says_how_tool_calls_are_read(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with caplog.at_level("INFO", logger="mlx_engine_server.chat.plan"):
        chat_formats(tokenizer, "auto", "auto")
        chat_formats(tokenizer, "none", "auto")
        chat_formats(tokenizer, "hermes", "auto")
    assert caplog.messages == [
        "tool calls: the generic fallback (the chat template renders no tools)",
        "tool calls: not parsed (--tool-call-parser none)",
        "tool calls: parsed as hermes (--tool-call-parser hermes)",
    ]


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_forced_calls_without_template_support_are_schema_valid(
    tiny_server: LiveServer, choice: Any
) -> None:
    completion = openai_sdk(tiny_server).chat.completions.create(
        model="m",
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice=choice,
        parallel_tool_calls=False,
        temperature=1.0,
        seed=5,
        max_tokens=30,
    )
    choice_out = completion.choices[0]
    assert choice_out.finish_reason == "tool_calls", choice_out.message
    assert choice_out.message.content is None
    calls = choice_out.message.tool_calls or []
    assert len(calls) == 1
    assert weather_city(calls[0].function.arguments) in ("Paris", "Rome")  # type: ignore[union-attr]


def test_anthropic_and_responses_forced_calls_on_the_fallback(tiny_server: LiveServer) -> None:
    message = anthropic_sdk(tiny_server).messages.create(
        model="m",
        max_tokens=30,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[{"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}],  # type: ignore[index,typeddict-item]
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        extra_body=GREEDY,
    )
    assert message.stop_reason == "tool_use"
    assert [block.type for block in message.content] == ["tool_use"]
    assert message.content[0].input["city"] in ("Paris", "Rome")  # type: ignore[union-attr,index]
    response = openai_sdk(tiny_server).responses.create(
        model="m",
        input="Weather in Paris?",
        tools=[{"type": "function", "name": "get_weather", **WEATHER["function"]}],  # type: ignore[list-item,dict-item]
        tool_choice="required",
        parallel_tool_calls=False,
        max_output_tokens=30,
        temperature=0.0,
    )
    (call,) = [item for item in response.output if item.type == "function_call"]
    assert weather_city(call.arguments) in ("Paris", "Rome")  # type: ignore[union-attr]
    assert response.output_text == ""


@pytest.fixture(scope="module")
def brace_fallback_server(
    tmp_path_factory: pytest.TempPathFactory, smollm_dir: Path
) -> Iterator[LiveServer]:
    """Opens a JSON object behind SmolLM2's own template: in auto mode, a call."""
    live = run_live_server(
        start_engine(brace_model(tmp_path_factory.mktemp("brace"), smollm_dir, None))
    )
    yield live
    live.stop()


def test_auto_gives_a_call_when_the_model_writes_one(brace_fallback_server: LiveServer) -> None:
    body = {
        "messages": ASK,
        "tools": [PING],
        "parallel_tool_calls": False,
        "max_tokens": 30,
        "temperature": 0.0,
    }
    completion = openai_sdk(brace_fallback_server).chat.completions.create(model="m", **body)  # type: ignore[call-overload]
    assert completion.choices[0].finish_reason == "tool_calls"
    assert completion.choices[0].message.content is None
    (call,) = completion.choices[0].message.tool_calls or []
    assert (call.function.name, call.function.arguments) == ("ping", "{}")  # type: ignore[union-attr]
    stream = openai_sdk(brace_fallback_server).chat.completions.create(
        model="m", stream=True, **body
    )  # type: ignore[call-overload]
    chunks = list(stream)
    assert not "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_auto_gives_text_when_the_model_writes_text(tiny_server: LiveServer) -> None:
    completion = openai_sdk(tiny_server).chat.completions.create(
        model="m",
        messages=ASK,
        tools=[WEATHER],
        temperature=0.0,
        max_tokens=8,  # type: ignore[arg-type,list-item]
    )
    message = completion.choices[0].message
    assert message.tool_calls is None
    assert message.content
    assert not message.content.startswith("{")


def test_refusing_is_a_setting_and_the_anthropic_error_names_tools(tiny_server: LiveServer) -> None:
    """--tool-call-parser none keeps the old answer: this template cannot show tools."""
    app = create_app(tiny_server.engine, ServerOptions(tool_call_parser="none"))
    client = TestClient(app)  # no lifespan: the shared engine keeps running
    body = {"messages": ASK, "tools": [WEATHER], "max_tokens": 4}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "tools"
    tool = {"name": "get_weather", "input_schema": {"type": "object"}}
    anthropic_body = {"model": "m", "max_tokens": 4, "messages": ASK, "tools": [tool]}
    response = client.post("/v1/messages", json=anthropic_body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("tools: ")


# --- 2. a forced call with a response_format; 3. a call or the format's JSON ---------------------


@pytest.mark.parametrize("server", ["tiny_server", "random_hermes_agent_server"])
def test_a_forced_call_with_a_response_format_is_the_call(
    request: pytest.FixtureRequest, server: str
) -> None:
    live: LiveServer = request.getfixturevalue(server)
    completion = openai_sdk(live).chat.completions.create(
        model="m",
        messages=ASK,  # type: ignore[arg-type]
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        parallel_tool_calls=False,
        response_format=SKY,  # type: ignore[arg-type]
        temperature=0.0,
        max_tokens=50,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert weather_city(call.function.arguments) in ("Paris", "Rome")  # type: ignore[union-attr]


def test_a_broken_response_format_is_still_refused_beside_a_forced_call(
    tiny_server: LiveServer,
) -> None:
    broken = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    body = {"messages": ASK, "tools": [WEATHER], "tool_choice": "required"}
    response = httpx.post(
        f"{tiny_server.base_url}/v1/chat/completions", json={**body, "response_format": broken}
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "response_format.json_schema.schema"


def test_with_auto_the_answer_is_the_formats_json_or_a_call(
    brace_hermes_server: LiveServer, hermes_agent_server: LiveServer
) -> None:
    body = {
        "messages": ASK,
        "tools": [WEATHER],
        "response_format": SKY,
        "max_tokens": 40,
        "temperature": 0.0,
        "parallel_tool_calls": False,
    }
    answer = openai_sdk(brace_hermes_server).chat.completions.create(model="m", **body)  # type: ignore[call-overload]
    assert answer.choices[0].message.tool_calls is None
    assert json.loads(answer.choices[0].message.content or "")["sky"] in ("sunny", "rainy")
    lookup = {"type": "function", "function": {"name": "lookup", "parameters": NO_ARGUMENTS}}
    called = openai_sdk(hermes_agent_server).chat.completions.create(
        model="m", **{**body, "tools": [lookup]}
    )  # type: ignore[call-overload]
    assert called.choices[0].finish_reason == "tool_calls", called.choices[0].message
    assert called.choices[0].message.tool_calls[0].function.name == "lookup"  # type: ignore[index]


# --- 4. a call cut off by max_tokens never shows as text ---------------------------------------

LOOKUP = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
# Inside the scripted '<tool_call>{"name":"lookup",...' (greedy: the script, token by token).
CUT = {"messages": ASK, "tools": [LOOKUP], "max_tokens": 6, "temperature": 0.0}


def test_a_cut_off_call_is_no_content_in_chat_answers_and_streams(
    hermes_agent_server: LiveServer,
) -> None:
    completion = openai_sdk(hermes_agent_server).chat.completions.create(model="m", **CUT)  # type: ignore[call-overload]
    choice = completion.choices[0]
    assert choice.finish_reason == "length"
    assert not choice.message.content
    assert choice.message.tool_calls is None
    stream = openai_sdk(hermes_agent_server).chat.completions.create(model="m", stream=True, **CUT)  # type: ignore[call-overload]
    chunks = [chunk for chunk in stream if chunk.choices]
    assert not "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert not any(chunk.choices[0].delta.tool_calls for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_cut_off_call_is_no_text_in_responses_or_anthropic_answers(
    hermes_agent_server: LiveServer,
) -> None:
    response = openai_sdk(hermes_agent_server).responses.create(
        model="m",
        input="Look it up",
        tools=[{"type": "function", "name": "lookup", "parameters": {"type": "object"}}],  # type: ignore[list-item]
        max_output_tokens=6,
        temperature=0.0,
    )
    assert response.status == "incomplete"
    assert response.output_text == ""
    assert not [item for item in response.output if item.type == "function_call"]
    tool = {"name": "lookup", "input_schema": {"type": "object"}}
    with anthropic_sdk(hermes_agent_server).messages.stream(
        model="m",
        max_tokens=6,
        messages=[{"role": "user", "content": "Look it up"}],
        tools=[tool],  # type: ignore[list-item]
        extra_body=GREEDY,
    ) as stream:
        texts = list(stream.text_stream)
        message = stream.get_final_message()
    assert not "".join(texts)
    assert message.stop_reason == "max_tokens"
    assert not [block for block in message.content if block.type in ("text", "tool_use")]


# SmolLM2, made to call `ping`, calls it again and again: at 24 tokens the first call is complete
# (18 tokens) and the second is cut off.
PINGS = {"tools": [PING], "tool_choice": "required", "max_tokens": 24, "temperature": 0.0}
PING_ASK = [{"role": "user", "content": "Weather in Paris and Rome?"}]


@pytest.mark.smollm
def test_calls_complete_before_the_cut_are_kept_in_chat_answers_and_streams(
    smollm_server: LiveServer,
) -> None:
    sdk = openai_sdk(smollm_server)
    choice = sdk.chat.completions.create(model="m", messages=PING_ASK, **PINGS).choices[0]  # type: ignore[call-overload]
    assert choice.finish_reason == "length"  # as OpenAI: a cut answer is "length", calls or not
    assert choice.message.content is None
    assert [
        (call.function.name, call.function.arguments) for call in choice.message.tool_calls
    ] == [("ping", "{}")]
    stream = sdk.chat.completions.create(model="m", messages=PING_ASK, stream=True, **PINGS)  # type: ignore[call-overload]
    chunks = [chunk for chunk in stream if chunk.choices]
    deltas = [delta for chunk in chunks for delta in chunk.choices[0].delta.tool_calls or ()]
    assert {delta.index for delta in deltas} == {0}
    assert [delta.function.name for delta in deltas if delta.function.name] == ["ping"]  # type: ignore[union-attr]
    assert "".join(delta.function.arguments or "" for delta in deltas) == "{}"  # type: ignore[union-attr]
    assert not "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.smollm
def test_calls_complete_before_the_cut_are_kept_in_responses(smollm_server: LiveServer) -> None:
    request: dict[str, Any] = {
        "model": "m",
        "input": PING_ASK[0]["content"],
        "tools": [{"type": "function", "name": "ping", "parameters": NO_ARGUMENTS}],
        "tool_choice": "required",
        "max_output_tokens": PINGS["max_tokens"],
        "temperature": 0.0,
    }
    sdk = openai_sdk(smollm_server)
    response = sdk.responses.create(**request)
    events = list(sdk.responses.create(stream=True, **request))
    assert events[-1].type == "response.incomplete"
    streamed = events[-1].response
    for answer in (response, streamed):
        assert answer.status == "incomplete"
        assert answer.incomplete_details is not None
        assert answer.incomplete_details.reason == "max_output_tokens"
        assert [(item.type, getattr(item, "name", None)) for item in answer.output] == [
            ("function_call", "ping")
        ]
    done = [event for event in events if event.type == "response.function_call_arguments.done"]
    assert [event.arguments for event in done] == ["{}"]


def test_the_documented_format_is_the_one_the_model_is_shown() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "tool-fallback.md").read_text()
    shown = INSTRUCTIONS.format(tools="{tools}").splitlines()
    assert all(line in doc for line in shown if line and line != "{tools}")
