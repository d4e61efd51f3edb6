"""/v1/conversations: create, read, update (metadata), delete; its items: list, add, read,
delete. A response given `conversation` reads the items and appends its own (responses/)."""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ...errors import NotFoundError
from ...http.body import read_model
from ..responses.render import new_id
from ..responses.routes import list_page, memory_of
from ..responses.stored import CONVERSATION, ResponseMemory, check_items, item_list
from .types import ConversationCreate, ConversationUpdate, ItemsCreate

ONE = "/v1/conversations/{conversation_id}"


async def create_conversation(request: Request) -> Response:
    body = await read_model(request, ConversationCreate)
    items = check_items(body.items or [])
    conversation_id = new_id("conv")
    conversation = {
        "id": conversation_id,
        "object": "conversation",
        "created_at": int(time.time()),
        "metadata": body.metadata or {},
    }
    memory = memory_of(request)
    await memory.store.put(memory.key(CONVERSATION, conversation_id), conversation, items)
    return JSONResponse(conversation)


async def get_conversation(request: Request) -> Response:
    memory, conversation_id = _target(request)
    return JSONResponse(await memory.conversation(conversation_id))


async def update_conversation(request: Request) -> Response:
    memory, conversation_id = _target(request)
    conversation = await memory.conversation(conversation_id)
    body = await read_model(request, ConversationUpdate)
    conversation["metadata"] = body.metadata or {}
    await memory.store.put(memory.key(CONVERSATION, conversation_id), conversation)
    return JSONResponse(conversation)


async def delete_conversation(request: Request) -> Response:
    memory, conversation_id = _target(request)
    if not await memory.store.delete(memory.key(CONVERSATION, conversation_id)):
        raise _not_found(conversation_id)
    return JSONResponse({"id": conversation_id, "object": "conversation.deleted", "deleted": True})


async def list_items(request: Request) -> Response:
    memory, conversation_id = _target(request)
    await memory.conversation(conversation_id)
    page = await list_page(request, memory.store, memory.key(CONVERSATION, conversation_id))
    return JSONResponse(item_list(page))


async def add_items(request: Request) -> Response:
    memory, conversation_id = _target(request)
    body = await read_model(request, ItemsCreate)
    items = check_items(body.items)
    if not await memory.store.add_items(memory.key(CONVERSATION, conversation_id), items):
        raise _not_found(conversation_id)
    return JSONResponse(
        {
            "object": "list",
            "data": items,
            "first_id": items[0]["id"],
            "last_id": items[-1]["id"],
            "has_more": False,
        }
    )


async def get_item(request: Request) -> Response:
    memory, conversation_id = _target(request)
    item_id = request.path_params["item_id"]
    item = await memory.store.get_item(memory.key(CONVERSATION, conversation_id), item_id)
    if item is None:
        raise NotFoundError(f"Item with id '{item_id}' not found.")
    return JSONResponse(item)


async def delete_item(request: Request) -> Response:
    """As OpenAI answers: the conversation the item was removed from."""
    memory, conversation_id = _target(request)
    item_id = request.path_params["item_id"]
    conversation = await memory.conversation(conversation_id)
    if not await memory.store.delete_item(memory.key(CONVERSATION, conversation_id), item_id):
        raise NotFoundError(f"Item with id '{item_id}' not found.")
    return JSONResponse(conversation)


def _target(request: Request) -> tuple[ResponseMemory, str]:
    return memory_of(request), request.path_params["conversation_id"]


def _not_found(conversation_id: str) -> NotFoundError:
    return NotFoundError(f"Conversation with id '{conversation_id}' not found.")


ROUTES_TABLE: list[tuple[str, Any, str]] = [
    ("/v1/conversations", create_conversation, "POST"),
    (ONE, get_conversation, "GET"),
    (ONE, update_conversation, "POST"),
    (ONE, delete_conversation, "DELETE"),
    (f"{ONE}/items", list_items, "GET"),
    (f"{ONE}/items", add_items, "POST"),
    (f"{ONE}/items/{{item_id}}", get_item, "GET"),
    (f"{ONE}/items/{{item_id}}", delete_item, "DELETE"),
]
