"""Stored Responses: what a response keeps (its object, its input items) and how a later request
continues it (`previous_response_id`: every stored turn of the chain, oldest first; or a
conversation's items). Records are the caller's own: another key's id is a 404, as on OpenAI.
"""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter, ValidationError

from ...errors import InternalError, InvalidRequestError, NotFoundError
from ...state.store import ItemPage, Json, RecordKey, StateStore
from .render import new_id
from .types import InputItem, MessageItem, ResponsesRequest

RESPONSE, CONVERSATION = "response", "conversation"
MAX_CHAIN = 1000  # responses followed back through previous_response_id
MAX_HISTORY_ITEMS = 100_000
ITEMS: TypeAdapter[list[InputItem]] = TypeAdapter(list[InputItem])
ITEM_ID_PREFIXES = {
    "message": "msg",
    "function_call": "fc",
    "function_call_output": "fco",
    "reasoning": "rs",
}


class ResponseMemory:
    """One caller's stored responses and conversations."""

    def __init__(self, store: StateStore, owner: str) -> None:
        self.store = store
        self.owner = owner

    def key(self, kind: str, record_id: str) -> RecordKey:
        return RecordKey(self.owner, kind, record_id)

    async def response(self, response_id: str, param: str | None = None) -> Json:
        record = await self.store.get(self.key(RESPONSE, response_id))
        if record is None:
            raise NotFoundError(f"Response with id '{response_id}' not found.", param=param)
        return record

    async def conversation(self, conversation_id: str, param: str | None = None) -> Json:
        record = await self.store.get(self.key(CONVERSATION, conversation_id))
        if record is None:
            raise NotFoundError(f"Conversation with id '{conversation_id}' not found.", param=param)
        return record

    async def all_items(self, key: RecordKey) -> list[Json]:
        page = await self.store.list_items(key, limit=MAX_HISTORY_ITEMS)
        return page.items

    async def history(self, body: ResponsesRequest) -> list[InputItem]:
        """The earlier turns a request continues, as input items."""
        if body.previous_response_id is not None:
            return _as_input(await self._chain_items(body.previous_response_id))
        if body.conversation_id is not None:
            await self.conversation(body.conversation_id, "conversation")
            return _as_input(await self.all_items(self.key(CONVERSATION, body.conversation_id)))
        return []

    async def _chain_items(self, response_id: str) -> list[Json]:
        chain = [await self.response(response_id, "previous_response_id")]
        while (earlier := chain[-1].get("previous_response_id")) and len(chain) < MAX_CHAIN:
            record = await self.store.get(self.key(RESPONSE, earlier))
            if record is None:  # deleted or expired: the chain starts after it
                break
            chain.append(record)
        items: list[Json] = []
        for record in reversed(chain):
            items += await self.all_items(self.key(RESPONSE, record["response"]["id"]))
            items += record["response"]["output"]
        return items

    async def keep(self, body: ResponsesRequest, response: Json) -> None:
        """Store a finished response (unless `store` is false) and add its turn to its
        conversation."""
        inputs = input_item_dicts(body)
        if body.stored:
            record = {"response": response, "previous_response_id": body.previous_response_id}
            await self.store.put(self.key(RESPONSE, response["id"]), record, inputs)
        if body.conversation_id is not None:
            turn = [*inputs, *response["output"]]
            await self.store.add_items(self.key(CONVERSATION, body.conversation_id), turn)


def with_history(body: ResponsesRequest, history: list[InputItem]) -> ResponsesRequest:
    """The request with the earlier turns before its own input."""
    if not history:
        return body
    own = [MessageItem(role="user", content=body.input)] if isinstance(body.input, str) else []
    return body.model_copy(update={"input": [*history, *(own or body.input)]})


def input_item_dicts(body: ResponsesRequest) -> list[Json]:
    """The request's input as stored items, each with an id (OpenAI's item shapes)."""
    if isinstance(body.input, str):
        return [stored_item({"type": "message", "role": "user", "content": body.input})]
    return [stored_item(item.model_dump(by_alias=True, exclude_none=True)) for item in body.input]


def stored_item(item: Json) -> Json:
    """An item as it is stored and listed: an id, a status, content as a list of parts."""
    item = {"type": "message", **item}
    kind = str(item["type"])
    item.setdefault("id", new_id(ITEM_ID_PREFIXES.get(kind, "item")))
    if kind == "message" and isinstance(item.get("content"), str):
        part = "output_text" if item.get("role") == "assistant" else "input_text"
        item["content"] = [{"type": part, "text": item["content"]}]
    item.setdefault("status", "completed")
    return item


def check_items(items: list[Any], param: str = "items") -> list[Json]:
    """Items given to a conversation: valid input items, stored with ids."""
    try:
        parsed = ITEMS.validate_python(items)
    except ValidationError as exc:
        first = exc.errors()[0]
        index, field = first["loc"][0], first["loc"][2:]  # [1]: the item type, a union's tag
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in field)
        raise InvalidRequestError(
            f"Invalid item: {first['msg']}", param=f"{param}[{index}]{where}"
        ) from None
    return [
        stored_item({**item.model_dump(by_alias=True, exclude_none=True), **_given_id(raw)})
        for item, raw in zip(parsed, items, strict=True)
    ]


def _given_id(raw: Any) -> Json:
    given = raw.get("id") if isinstance(raw, dict) else None
    return {"id": given} if isinstance(given, str) and given else {}


def _as_input(items: list[Json]) -> list[InputItem]:
    try:
        return ITEMS.validate_python(items)
    except ValidationError:
        raise InternalError("A stored item could not be read back.") from None


def item_list(page: ItemPage) -> Json:
    """OpenAI's list object of items."""
    data = page.items
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": page.has_more,
    }
