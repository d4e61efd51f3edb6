"""POST /v1/responses: OpenAI's Responses API (stateless) on the chat pipeline.

Errors keep OpenAI's shape, with `param` naming the Responses field (`input`, `text.format`, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ...chat.output import OutputSplitter
from ...errors import APIError
from ...http.body import read_model, validate_model
from ...http.sse import GenerationStream
from ...pipeline.admission import collect
from ...pipeline.events import named_events
from ...pipeline.prepare import summary_usage
from ...pipeline.run import ChatRun, start_chat
from ..openai.types import ChatCompletionRequest
from .render import (
    OutputItems,
    ResponseHead,
    ResponseStream,
    final_status,
    response_body,
    usage_body,
)
from .translate import chat_fields, responses_param
from .types import ResponsesRequest


async def responses(request: Request) -> Response:
    body = await read_model(request, ResponsesRequest)
    try:
        chat = validate_model(ChatCompletionRequest, chat_fields(body))
        run = await start_chat(request, chat)
    except APIError as error:
        raise responses_param(error, body) from None
    head = ResponseHead.new(run.model_id, _echo(body))
    if body.stream:
        response = _stream(request, run, head)
    else:
        response = await _whole(request, run, head)
    response.headers.update(run.headers())
    return response


def _count_tokens(request: Request) -> Callable[[str], int]:
    tokenizer = request.app.state.engine.tokenizer

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False)) if text else 0

    return count


def _stream(request: Request, run: ChatRun, head: ResponseHead) -> Response:
    shape = ResponseStream(head, _count_tokens(request), summary_usage(run.compaction))
    events = named_events(run.generation, shape, run.rules)
    return GenerationStream(run.generation, events, run.shutdown_grace_s)


async def _whole(request: Request, run: ChatRun, head: ResponseHead) -> Response:
    (result,), usage = await collect(run.generation, request.receive, 1, 1)
    splitter = OutputSplitter(run.rules)
    items = OutputItems()
    items.add(splitter.feed(result.text))
    items.add(splitter.finish(cut_off=result.finish_reason == "length"))
    status = final_status(result.finish_reason)
    items.close(status)
    reasoning_tokens = _count_tokens(request)(items.reasoning_text)
    usage = usage.with_summary(summary_usage(run.compaction))
    body = response_body(head, status, items.items, usage_body(usage, reasoning_tokens))
    return JSONResponse(body)


def _echo(body: ResponsesRequest) -> dict[str, Any]:
    """The request's settings as the response object repeats them."""
    text_format = body.text.format if body.text and body.text.format else None
    choice = body.tool_choice
    return {
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
