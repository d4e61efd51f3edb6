"""OpenAI's Responses API on the chat pipeline: POST /v1/responses, and the stored ones
(GET and DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items).

Errors keep OpenAI's shape, with `param` naming the Responses field (`input`, `text.format`, ...).
A stored response is written before its last event or its body reaches the client.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ...chat.output import OutputSplitter
from ...errors import APIError, InvalidRequestError, NotFoundError
from ...http.body import read_model, validate_model
from ...http.context import request_context
from ...http.guards import request_owner
from ...http.sse import GenerationStream
from ...pipeline.admission import collect
from ...pipeline.events import named_events
from ...pipeline.prepare import summary_usage
from ...pipeline.run import ChatRun, start_chat
from ...state.store import ItemPage, RecordKey, StateStore
from ..openai.types import ChatCompletionRequest
from .render import (
    OutputItems,
    ResponseHead,
    ResponseStream,
    final_status,
    response_body,
    usage_body,
)
from .stored import RESPONSE, ResponseMemory, item_list, with_history
from .translate import chat_fields, responses_param
from .types import ResponsesRequest

MAX_LIST_LIMIT = 100
LIST_LIMIT = re.compile(r"[0-9]{1,3}")


async def responses(request: Request) -> Response:
    body = await read_model(request, ResponsesRequest)
    memory = memory_of(request)
    history = await memory.history(body)
    try:
        chat = validate_model(ChatCompletionRequest, chat_fields(with_history(body, history)))
        run = await start_chat(request_context(request), chat)
    except APIError as error:
        raise responses_param(error, body) from None
    head = ResponseHead.new(run.model_id, _echo(body))
    if body.stream:
        response = _stream(request, run, head, body, memory)
    else:
        response = await _whole(request, run, head, body, memory)
    response.headers.update(run.headers())
    return response


def memory_of(request: Request) -> ResponseMemory:
    return ResponseMemory(request.app.state.store, request_owner(request.scope))


async def get_response(request: Request) -> Response:
    record = await memory_of(request).response(request.path_params["response_id"])
    return JSONResponse(record["response"])


async def delete_response(request: Request) -> Response:
    response_id = request.path_params["response_id"]
    memory = memory_of(request)
    if not await memory.store.delete(memory.key(RESPONSE, response_id)):
        raise NotFoundError(f"Response with id '{response_id}' not found.")
    return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})


async def list_input_items(request: Request) -> Response:
    memory = memory_of(request)
    record = await memory.response(request.path_params["response_id"])
    page = await list_page(request, memory.store, memory.key(RESPONSE, record["response"]["id"]))
    return JSONResponse(item_list(page))


async def list_page(request: Request, store: StateStore, key: RecordKey) -> ItemPage:
    """One page of a list's items. An `after` not in the list is a 400: read as "from the
    start", a client paging on past a deleted item would be handed the first pages again."""
    query = list_query(request)
    after = query["after"]
    if after is not None and await store.get_item(key, after) is None:
        raise InvalidRequestError(f"No item with id '{after}' in this list.", param="after")
    return await store.list_items(key, **query)


def list_query(request: Request, default_order: str = "desc") -> dict[str, Any]:
    """OpenAI's list parameters: limit (1-100, 20), order (asc|desc), after (an item id)."""
    query = request.query_params
    limit = query.get("limit", "20")
    # ASCII digits only: str.isdigit() also takes '²', which int() refuses.
    if not LIST_LIMIT.fullmatch(limit) or not 1 <= int(limit) <= MAX_LIST_LIMIT:
        raise InvalidRequestError(
            f"limit must be an integer from 1 to {MAX_LIST_LIMIT}.", param="limit"
        )
    order = query.get("order", default_order)
    if order not in ("asc", "desc"):
        raise InvalidRequestError("order must be 'asc' or 'desc'.", param="order")
    return {"limit": int(limit), "after": query.get("after"), "descending": order == "desc"}


def _count_tokens(request: Request) -> Callable[[str], int]:
    tokenizer = request.app.state.engine.tokenizer

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False)) if text else 0

    return count


def _stream(
    request: Request,
    run: ChatRun,
    head: ResponseHead,
    body: ResponsesRequest,
    memory: ResponseMemory,
) -> Response:
    shape = ResponseStream(head, _count_tokens(request), summary_usage(run.compaction))
    events = _kept_before_closing(
        named_events(run.generation, shape, run.rules), shape, body, memory
    )
    return GenerationStream(run.generation, events, run.shutdown_grace_s)


async def _kept_before_closing(
    events: AsyncIterator[dict[str, str]],
    shape: ResponseStream,
    body: ResponsesRequest,
    memory: ResponseMemory,
) -> AsyncIterator[dict[str, str]]:
    """The stream's events; the finished response is stored before its closing events go."""
    kept = False
    async for event in events:
        if shape.final is not None and not kept:
            await memory.keep(body, shape.final)
            kept = True
        yield event


async def _whole(
    request: Request,
    run: ChatRun,
    head: ResponseHead,
    body: ResponsesRequest,
    memory: ResponseMemory,
) -> Response:
    (result,), usage = await collect(run.generation, request.receive, 1, 1)
    splitter = OutputSplitter(run.rules)
    items = OutputItems()
    items.add(splitter.feed(result.text), result.logprobs)
    items.add(splitter.finish(cut_off=result.finish_reason == "length"))
    status = final_status(result.finish_reason)
    items.close(status)
    reasoning_tokens = _count_tokens(request)(items.reasoning_text)
    usage = usage.with_summary(summary_usage(run.compaction))
    answer = response_body(head, status, items.items, usage_body(usage, reasoning_tokens))
    await memory.keep(body, answer)
    return JSONResponse(answer)


def _echo(body: ResponsesRequest) -> dict[str, Any]:
    """The request's settings as the response object repeats them."""
    text_format = body.text.format if body.text and body.text.format else None
    choice = body.tool_choice
    conversation = body.conversation_id
    return {
        "store": body.stored,
        "previous_response_id": body.previous_response_id,
        "conversation": {"id": conversation} if conversation is not None else None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "max_tool_calls": None,
        "metadata": body.metadata or {},
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "reasoning": {
            "effort": body.reasoning.effort if body.reasoning else None,
            "summary": body.reasoning.summary if body.reasoning else None,
        },
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "text": {
            "format": text_format.model_dump(by_alias=True, exclude_none=True)
            if text_format
            else {"type": "text"},
        },
        "tool_choice": choice.model_dump()
        if choice is not None and not isinstance(choice, str)
        else choice or "auto",
        "tools": [
            {
                "type": "function",
                "name": tool.name,
                "description": tool.description,
                "parameters": tool.parameters,
                "strict": tool.strict,
            }
            for tool in body.tools or ()
        ],
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "user": body.user,
    }
