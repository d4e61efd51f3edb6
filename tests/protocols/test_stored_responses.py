"""Stored Responses over real HTTP with the official `openai` SDK: continue a response by its
id (the prefix cache reports the earlier turns as cached), retrieve, list its input items,
delete; each key sees only its own; `store: false` keeps nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from openai import OpenAI

from mlx_engine_server.http.app import ServerOptions

from ..conftest import LiveServer, close_after_test, run_live_server, start_engine

TURN = {"model": "m", "max_output_tokens": 4, "temperature": 0}


def sdk(live: LiveServer, key: str = "unused") -> OpenAI:
    return close_after_test(OpenAI(base_url=f"{live.base_url}/v1", api_key=key, max_retries=0))


def test_a_continued_response_is_the_whole_conversation_with_its_prefix_cached(
    tiny_server: LiveServer,
) -> None:
    client = sdk(tiny_server)
    first = client.responses.create(input="Hello there", **TURN)
    second = client.responses.create(input="And then?", previous_response_id=first.id, **TURN)
    whole = client.responses.create(
        input=[
            {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "And then?"},
        ],
        store=False,
        **TURN,
    )
    assert second.previous_response_id == first.id
    assert second.output_text == whole.output_text
    assert first.usage is not None
    assert second.usage is not None
    assert whole.usage is not None
    assert second.usage.input_tokens == whole.usage.input_tokens > first.usage.input_tokens
    # the first turn's prompt was computed once; the continuation reuses it from the cache
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 1
    third = client.responses.create(input="Why?", previous_response_id=second.id, **TURN)
    assert third.usage is not None
    assert third.usage.input_tokens > second.usage.input_tokens  # the whole chain, both turns


def test_a_stored_response_is_retrieved_listed_and_deleted(tiny_server: LiveServer) -> None:
    client = sdk(tiny_server)
    conversation = [{"role": "user", "content": f"message {i}"} for i in range(3)]
    created = client.responses.create(input=conversation, instructions="Be brief.", **TURN)
    assert created.model_extra is not None
    assert created.model_extra["store"] is True
    fetched = client.responses.retrieve(created.id)
    assert (fetched.id, fetched.output_text, fetched.instructions) == (
        created.id,
        created.output_text,
        "Be brief.",
    )
    newest_first = client.responses.input_items.list(created.id, limit=2)
    texts = [item.content[0].text for item in newest_first.data]  # type: ignore[union-attr]
    assert texts == ["message 2", "message 1"]
    assert newest_first.has_more
    rest = client.responses.input_items.list(created.id, limit=2, after=newest_first.data[-1].id)
    assert [item.content[0].text for item in rest.data] == ["message 0"]  # type: ignore[union-attr]
    assert not rest.has_more
    every = list(client.responses.input_items.list(created.id, order="asc", limit=1))
    assert [item.content[0].text for item in every] == [m["content"] for m in conversation]  # type: ignore[union-attr]
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(input="more", previous_response_id=created.id, **TURN)


def test_a_streamed_response_is_stored(tiny_server: LiveServer) -> None:
    client = sdk(tiny_server)
    events = list(client.responses.create(input="Stream this", stream=True, **TURN))
    assert events[-1].type == "response.incomplete"  # four tokens of random weights
    final = events[-1].response
    fetched = client.responses.retrieve(final.id)
    assert fetched.output_text == final.output_text
    assert fetched.status == final.status == "incomplete"


def test_store_false_keeps_nothing(tiny_server: LiveServer) -> None:
    client = sdk(tiny_server)
    response = client.responses.create(input="Hello", store=False, **TURN)
    assert response.model_extra is not None
    assert response.model_extra["store"] is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_list_parameters_are_checked(tiny_server: LiveServer) -> None:
    created = sdk(tiny_server).responses.create(input="Hello", **TURN)
    url = f"{tiny_server.base_url}/v1/responses/{created.id}/input_items"
    bad = (
        *({"limit": "0"}, {"limit": "\u00b2"}, {"limit": "9" * 40}, {"order": "up"}),
        {"after": "msg_not_in_this_list"},  # was read as "from the start"
    )
    for query in bad:  # '²' passes str.isdigit() but not int(): it was a 500
        param = next(iter(query))
        answer = httpx.get(url, params=query)
        assert answer.status_code == 400
        assert answer.json()["error"]["param"] == param
    missing = httpx.post(
        f"{tiny_server.base_url}/v1/responses",
        json={**TURN, "input": "x", "previous_response_id": "resp_none"},
    )
    assert missing.status_code == 404
    assert missing.json()["error"]["param"] == "previous_response_id"


def test_a_responses_metadata_has_openais_limits_as_it_is_stored(tiny_server: LiveServer) -> None:
    """17 pairs or a 513-character value were stored as sent (a conversation refused them)."""
    for metadata in ({str(pair): "v" for pair in range(17)}, {"k": "v" * 513}):
        answer = httpx.post(
            f"{tiny_server.base_url}/v1/responses",
            json={**TURN, "input": "x", "metadata": metadata},
        )
        assert answer.status_code == 400
        assert answer.json()["error"]["param"] == "metadata"


@pytest.fixture(scope="module")
def two_key_server(tiny_model_dir: Path) -> Iterator[LiveServer]:
    options = ServerOptions(api_keys=("key-of-alice", "key-of-bob"))
    live = run_live_server(start_engine(tiny_model_dir), options)
    yield live
    live.stop()


def test_one_key_cannot_read_or_continue_another_keys_response(
    two_key_server: LiveServer,
) -> None:
    alice, bob = sdk(two_key_server, "key-of-alice"), sdk(two_key_server, "key-of-bob")
    created = alice.responses.create(input="Secret", **TURN)
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.input_items.list(created.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.create(input="more", previous_response_id=created.id, **TURN)
    with pytest.raises(openai.NotFoundError):
        bob.responses.delete(created.id)
    assert alice.responses.retrieve(created.id).id == created.id


def test_a_function_call_is_answered_by_its_output_in_the_next_response(
    hermes_agent_server: LiveServer,
) -> None:
    """The stored output's function_call is the turn a function_call_output answers."""
    client = sdk(hermes_agent_server)
    lookup = {"type": "function", "name": "lookup", "parameters": {"type": "object"}}
    asked = client.responses.create(model="m", input="Look it up", tools=[lookup], temperature=0)
    (call,) = [item for item in asked.output if item.type == "function_call"]
    answered = client.responses.create(
        model="m",
        previous_response_id=asked.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "42"}],
        tools=[lookup],
        max_output_tokens=4,
        temperature=0,
    )
    assert answered.status in ("completed", "incomplete")
    assert answered.usage is not None
    assert asked.usage is not None
    assert answered.usage.input_tokens > asked.usage.input_tokens
    items = client.responses.input_items.list(answered.id)
    assert [item.type for item in items.data] == ["function_call_output"]
