"""The Conversations API over real HTTP with the official `openai` SDK: a conversation's items,
its metadata, a response that reads and extends it; another key sees none of it."""

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
ALICE, BOB = "key-of-alice", "key-of-bob"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[LiveServer]:
    live = run_live_server(start_engine(tiny_model_dir), ServerOptions(api_keys=(ALICE, BOB)))
    yield live
    live.stop()


def sdk(live: LiveServer, key: str = ALICE) -> OpenAI:
    return close_after_test(OpenAI(base_url=f"{live.base_url}/v1", api_key=key, max_retries=0))


def texts(items: list[object]) -> list[str]:
    return [item.content[0].text for item in items]  # type: ignore[attr-defined]


def test_a_conversations_items_and_metadata(server: LiveServer) -> None:
    client = sdk(server)
    conversation = client.conversations.create(
        items=[{"type": "message", "role": "user", "content": "first"}],
        metadata={"topic": "demo"},
    )
    assert conversation.id.startswith("conv_")
    assert client.conversations.retrieve(conversation.id).metadata == {"topic": "demo"}
    added = client.conversations.items.create(
        conversation.id,
        items=[
            {"type": "message", "role": "user", "content": "second"},
            {"type": "message", "role": "assistant", "content": "third"},
        ],
    )
    assert texts(added.data) == ["second", "third"]
    listed = client.conversations.items.list(conversation.id, order="asc")
    assert texts(listed.data) == ["first", "second", "third"]
    assert texts(client.conversations.items.list(conversation.id, limit=1).data) == ["third"]
    second_id = listed.data[1].id  # type: ignore[union-attr]
    item = client.conversations.items.retrieve(second_id, conversation_id=conversation.id)
    assert texts([item]) == ["second"]
    client.conversations.items.delete(second_id, conversation_id=conversation.id)
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.retrieve(second_id, conversation_id=conversation.id)
    updated = client.conversations.update(conversation.id, metadata={"topic": "changed"})
    assert updated.metadata == {"topic": "changed"}
    assert client.conversations.delete(conversation.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conversation.id)
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.list(conversation.id)


def test_a_response_in_a_conversation_reads_and_extends_it(server: LiveServer) -> None:
    client = sdk(server)
    conversation = client.conversations.create(
        items=[{"type": "message", "role": "user", "content": "My name is Ada."}]
    )
    first = client.responses.create(input="What is my name?", conversation=conversation.id, **TURN)
    assert first.conversation is not None
    assert first.conversation.id == conversation.id
    whole = client.responses.create(
        input=[
            {"role": "user", "content": "My name is Ada."},
            {"role": "user", "content": "What is my name?"},
        ],
        store=False,
        **TURN,
    )
    assert first.output_text == whole.output_text
    assert first.usage is not None
    assert whole.usage is not None
    assert first.usage.input_tokens == whole.usage.input_tokens
    items = client.conversations.items.list(conversation.id, order="asc").data
    assert [item.type for item in items] == ["message", "message", "message"]
    assert texts(items) == ["My name is Ada.", "What is my name?", first.output_text]
    second = client.responses.create(input="Again?", conversation={"id": conversation.id}, **TURN)
    assert second.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 1
    assert len(client.conversations.items.list(conversation.id).data) == 5


def test_another_keys_conversation_is_not_found(server: LiveServer) -> None:
    conversation = sdk(server, ALICE).conversations.create()
    bob = sdk(server, BOB)
    with pytest.raises(openai.NotFoundError):
        bob.conversations.retrieve(conversation.id)
    with pytest.raises(openai.NotFoundError):
        bob.conversations.items.create(
            conversation.id, items=[{"type": "message", "role": "user", "content": "x"}]
        )
    with pytest.raises(openai.NotFoundError):
        bob.responses.create(input="x", conversation=conversation.id, **TURN)
    with pytest.raises(openai.NotFoundError):
        bob.conversations.delete(conversation.id)
    assert sdk(server, ALICE).conversations.retrieve(conversation.id).id == conversation.id


def test_bad_conversation_bodies_are_400s_naming_the_field(server: LiveServer) -> None:
    headers = {"Authorization": f"Bearer {ALICE}"}
    url = f"{server.base_url}/v1/conversations"
    cases = [
        ({"items": [{"type": "message", "role": "robot", "content": "x"}]}, "items[0].role"),
        ({"metadata": {str(i): "x" for i in range(17)}}, "metadata"),
    ]
    for body, param in cases:
        answer = httpx.post(url, json=body, headers=headers)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == param
    empty = httpx.post(f"{url}/conv_none/items", json={"items": []}, headers=headers)
    assert empty.status_code == 400


def test_a_conversation_is_made_from_no_body_at_all(server: LiveServer) -> None:
    """As on OpenAI: every field of the create (and update) body is optional."""
    headers = {"Authorization": f"Bearer {ALICE}"}
    made = httpx.post(f"{server.base_url}/v1/conversations", headers=headers)
    assert made.status_code == 200, made.text
    assert made.json()["metadata"] == {}
    url = f"{server.base_url}/v1/conversations/{made.json()['id']}"
    assert httpx.post(url, headers=headers).status_code == 200
    items = httpx.post(f"{url}/items", headers=headers)  # `items` is required there
    assert items.status_code == 400
    assert items.json()["error"]["code"] == "invalid_json"


def test_a_repeated_item_id_keeps_its_first_place(server: LiveServer) -> None:
    client = sdk(server)
    first = {"type": "message", "role": "user", "content": "first", "id": "msg_same"}
    conversation = client.conversations.create(
        items=[first, {"type": "message", "role": "user", "content": "second"}]
    )
    client.conversations.items.create(
        conversation.id, items=[{**first, "content": "first, edited"}]
    )
    listed = client.conversations.items.list(conversation.id, order="asc")
    assert texts(listed.data) == ["first, edited", "second"]


def test_an_item_that_is_not_an_object_is_a_400(server: LiveServer) -> None:
    answer = httpx.post(
        f"{server.base_url}/v1/conversations",
        json={"items": ["hello"]},
        headers={"Authorization": f"Bearer {ALICE}"},
    )
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "items[0]"


def test_another_keys_session_is_not_found(server: LiveServer) -> None:
    """Sessions (the chat route's session_id) are scoped by key the same way."""
    sdk(server, ALICE).chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=2,
        extra_body={"session_id": "same-name"},
    )
    url = f"{server.base_url}/v1/sessions/same-name"
    assert httpx.get(url, headers={"Authorization": f"Bearer {ALICE}"}).status_code == 200
    assert httpx.get(url, headers={"Authorization": f"Bearer {BOB}"}).status_code == 404
    assert httpx.delete(url, headers={"Authorization": f"Bearer {BOB}"}).status_code == 404
    # Bob's session of the same name is his own, and starts empty
    sdk(server, BOB).chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=2,
        extra_body={"session_id": "same-name"},
    )
    bobs = httpx.get(url, headers={"Authorization": f"Bearer {BOB}"}).json()
    assert [message["content"] for message in bobs["messages"][:1]] == ["Hello"]
    assert len(bobs["messages"]) == 2
