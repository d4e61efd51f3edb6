"""Pydantic AI, unchanged, against the server: a tool-calling agent with a structured output.

Pydantic AI returns a structured output through an output tool (`final_result`) and, when the
agent may not answer in text, sends every request with `tool_choice: "required"`: on the bundled
SmolLM2, whose template renders no tools, the generic fallback's grammar then makes each turn a
valid call. The lookup tool is offered until it has run (what a 135M model does when offered it
again is its own choice), so the second turn can only be the final result.
"""

from __future__ import annotations

import asyncio
from typing import Literal

import pytest
from openai import AsyncOpenAI
from pydantic import BaseModel
from pydantic_ai import Agent, AgentRunResult, ModelSettings, RunContext, UsageLimits
from pydantic_ai.messages import ModelResponse, ToolCallPart
from pydantic_ai.models.openai import OpenAIChatModel, OpenAIResponsesModel
from pydantic_ai.providers.openai import OpenAIProvider
from pydantic_ai.tools import ToolDefinition

from ..conftest import LiveServer


class Weather(BaseModel):
    city: Literal["Paris", "Rome"]
    sky: Literal["sunny", "rainy"]


def weather_agent(client: AsyncOpenAI, api: str, calls: list[str]) -> Agent[None, Weather]:
    provider = OpenAIProvider(openai_client=client)
    model = (
        OpenAIResponsesModel("served", provider=provider)
        if api == "responses"
        else OpenAIChatModel("served", provider=provider)
    )
    agent = Agent(
        model,
        output_type=Weather,
        instructions="Look up the weather, then report it.",
        model_settings=ModelSettings(temperature=0.0, max_tokens=60, parallel_tool_calls=False),
    )

    async def until_called(_ctx: RunContext[None], tool: ToolDefinition) -> ToolDefinition | None:
        return None if calls else tool

    @agent.tool_plain(prepare=until_called)
    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"It is sunny in {city}."

    return agent


async def run_agent(live: LiveServer, api: str, calls: list[str]) -> AgentRunResult[Weather]:
    async with AsyncOpenAI(
        base_url=f"{live.base_url}/v1", api_key="unused", max_retries=0
    ) as client:
        return await weather_agent(client, api, calls).run(
            "What is the weather in Paris?", usage_limits=UsageLimits(request_limit=3)
        )


@pytest.mark.smollm
@pytest.mark.parametrize("api", ["chat_completions", "responses"])
def test_a_pydantic_ai_agent_calls_its_tool_then_answers(
    smollm_server: LiveServer, api: str
) -> None:
    calls: list[str] = []
    result = asyncio.run(run_agent(smollm_server, api, calls))
    assert calls == ["Paris"]
    assert result.output == Weather(city="Paris", sky="sunny")
    called = [
        part.tool_name
        for message in result.all_messages()
        if isinstance(message, ModelResponse)
        for part in message.parts
        if isinstance(part, ToolCallPart)
    ]
    assert called == ["get_weather", "final_result"]
    usage = result.usage
    assert usage.requests == 2
    assert usage.input_tokens > 0
    assert usage.output_tokens > 0
