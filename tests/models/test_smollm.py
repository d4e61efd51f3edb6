"""End-to-end truth with the real SmolLM2-135M-Instruct weights, over a real socket."""

from __future__ import annotations

import pytest
from openai import OpenAI

from ..conftest import LiveServer

pytestmark = pytest.mark.smollm

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def sdk(smollm_server: LiveServer) -> OpenAI:
    return OpenAI(base_url=f"{smollm_server.base_url}/v1", api_key="unused", max_retries=0)


def test_greedy_answer_names_paris(sdk: OpenAI) -> None:
    reply = sdk.chat.completions.create(
        model="SmolLM2", messages=FRANCE, max_tokens=20, temperature=0
    )
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_streamed_text_equals_non_streamed(sdk: OpenAI) -> None:
    whole = sdk.chat.completions.create(model="x", messages=FRANCE, max_tokens=12, temperature=0)
    stream = sdk.chat.completions.create(
        model="x",
        messages=FRANCE,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces = []
    usage = None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == whole.choices[0].message.content
    assert usage is not None
    assert whole.usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_max_tokens_five_gives_exactly_five_and_length(sdk: OpenAI) -> None:
    reply = sdk.chat.completions.create(
        model="x",
        messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        max_tokens=5,
        temperature=0,
    )
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 5
    assert reply.choices[0].finish_reason == "length"


def test_text_completion_continues_the_prompt(sdk: OpenAI) -> None:
    reply = sdk.completions.create(
        model="x", prompt="The capital of France is", max_tokens=4, temperature=0
    )
    assert "Paris" in reply.choices[0].text


def test_second_turn_reuses_the_first_turns_prefill(sdk: OpenAI) -> None:
    first = sdk.chat.completions.create(model="x", messages=FRANCE, max_tokens=8, temperature=0)
    history = [
        *FRANCE,
        {"role": "assistant", "content": first.choices[0].message.content or ""},
        {"role": "user", "content": "And of Italy?"},
    ]
    second = sdk.chat.completions.create(model="x", messages=history, max_tokens=8, temperature=0)
    assert first.usage is not None
    assert second.usage is not None
    details = second.usage.prompt_tokens_details
    assert details is not None
    assert details.cached_tokens is not None
    assert details.cached_tokens >= first.usage.prompt_tokens
    assert "Rome" in (second.choices[0].message.content or "")
