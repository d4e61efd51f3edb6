"""The OpenAI Agents SDK, unchanged, against the server: an agent with a tool and an output_type.

The SDK sends the tool with `tool_choice: "required"` and the output type's schema together
(`response_format`, or the Responses API's `text.format`), then, once the tool has run, the same
request without the forced choice: a call or the structured final answer. Both of the SDK's
models (Responses and chat completions) run against the bundled SmolLM2, whose template renders
no tools (the generic fallback), and against a model behind a template that renders them.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import pytest
from agents import (
    Agent,
    FunctionTool,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    RunConfig,
    Runner,
    function_tool,
)
from openai import AsyncOpenAI
from pydantic import BaseModel

from ..conftest import LiveServer


class Weather(BaseModel):
    city: Literal["Paris", "Rome"]
    sky: Literal["sunny", "rainy"]


def weather_tool(calls: list[str], *, once: bool) -> FunctionTool:
    """`once`: the tool is offered until it has run (SmolLM2-135M, offered it again, calls it
    again rather than answering: what a model does with `auto` is the model's choice)."""

    def offered(_context: Any, _agent: Any) -> bool:
        return not (once and calls)

    @function_tool(is_enabled=offered)
    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"It is sunny in {city}."

    return get_weather


def run_agent(live: LiveServer, api: str, *, once: bool) -> tuple[Weather, list[str]]:
    return asyncio.run(_run_agent(live, api, once=once))


async def _run_agent(live: LiveServer, api: str, *, once: bool) -> tuple[Weather, list[str]]:
    calls: list[str] = []
    async with AsyncOpenAI(
        base_url=f"{live.base_url}/v1", api_key="unused", max_retries=0
    ) as client:
        model = (
            OpenAIResponsesModel("served", client)
            if api == "responses"
            else OpenAIChatCompletionsModel("served", client)
        )
        agent = Agent(
            name="weather",
            instructions="Look up the weather, then report it.",
            tools=[weather_tool(calls, once=once)],
            output_type=Weather,
            model=model,
            model_settings=ModelSettings(
                tool_choice="required",
                parallel_tool_calls=False,
                temperature=0.0,
                max_tokens=60,
            ),
        )
        result = await Runner.run(
            agent,
            "What is the weather in Paris?",
            max_turns=3,
            run_config=RunConfig(tracing_disabled=True),
        )
    return result.final_output_as(Weather), calls


@pytest.mark.smollm
@pytest.mark.parametrize("api", ["chat_completions", "responses"])
def test_an_agent_on_the_bundled_model(smollm_server: LiveServer, api: str) -> None:
    weather, calls = run_agent(smollm_server, api, once=True)
    assert len(calls) == 1
    assert isinstance(weather, Weather)


@pytest.mark.parametrize("api", ["responses", "chat_completions"])
def test_an_agent_on_a_model_whose_template_renders_tools(
    brace_hermes_server: LiveServer, api: str
) -> None:
    """The second turn offers the tool again: the model answers the schema's JSON instead."""
    weather, calls = run_agent(brace_hermes_server, api, once=False)
    assert len(calls) == 1
    assert isinstance(weather, Weather)
