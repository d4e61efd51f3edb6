"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API on the chat pipeline;
GET /v1/models (and one model) as Anthropic's Models API lists them.

Errors on these routes leave in Anthropic's shape (`{"type": "error", "error": {"type",
"message"}}`, its ANTHROPIC dialect); every other route keeps OpenAI's. /v1/models is a path of
both APIs: http/app.py sends a request there when it carries Anthropic's version header.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

from sse_starlette import ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ...chat.output import OutputSplitter
from ...engine import EngineClient, Finished
from ...engine.messages import FinishReason
from ...http.body import read_model, validate_model
from ...http.context import request_context
from ...http.sse import GenerationStream
from ...pipeline.admission import collect
from ...pipeline.events import named_events
from ...pipeline.prepare import count_chat_tokens, model_not_found, summary_usage
from ...pipeline.run import ChatRun, start_chat
from ..openai.types import ChatCompletionRequest
from .render import (
    ANTHROPIC,
    ContentBlocks,
    MessageStream,
    message_body,
    new_message_id,
)
from .translate import chat_fields, generation_fields
from .types import CountTokensRequest, MessagesRequest

logger = logging.getLogger(__name__)

Endpoint = Callable[[Request], Awaitable[Response]]


async def messages(request: Request) -> Response:
    body = await read_model(request, MessagesRequest)
    chat = validate_model(ChatCompletionRequest, generation_fields(body))
    run = await start_chat(request_context(request), chat)
    omit_thinking = body.thinking is not None and body.thinking.display == "omitted"
    response = (
        _stream(run, omit_thinking=omit_thinking)
        if body.stream
        else await _whole(request, run, omit_thinking=omit_thinking)
    )
    response.headers.update(run.headers())
    return response


def _stream(run: ChatRun, *, omit_thinking: bool) -> Response:
    summary = summary_usage(run.compaction)
    shape = MessageStream(run.model_id, run.prompt_tokens, summary, omit_thinking=omit_thinking)
    events = named_events(run.generation, shape, run.rules)
    return GenerationStream(run.generation, events, run.shutdown_grace_s, ping=_ping)


def _ping() -> ServerSentEvent:
    return ServerSentEvent(event="ping", data='{"type": "ping"}')


async def _whole(request: Request, run: ChatRun, *, omit_thinking: bool) -> Response:
    (result,), usage = await collect(run.generation, request.receive, 1, 1)
    splitter = OutputSplitter(run.rules)
    blocks = ContentBlocks(omit_thinking=omit_thinking)
    blocks.add(splitter.feed(result.text))
    blocks.add(splitter.finish(cut_off=result.finish_reason == "length"))
    finish_reason: FinishReason = "length" if result.finish_reason == "length" else "stop"
    finished = Finished(finish_reason, usage, result.stop_sequence)
    body = message_body(
        new_message_id(),
        run.model_id,
        blocks.blocks,
        finished,
        usage.with_summary(summary_usage(run.compaction)),
        made_tool_calls=splitter.made_tool_calls,
    )
    return JSONResponse(body)


async def count_tokens(request: Request) -> Response:
    body = await read_model(request, CountTokensRequest)
    chat = validate_model(ChatCompletionRequest, chat_fields(body))
    return JSONResponse({"input_tokens": await count_chat_tokens(request_context(request), chat)})


async def list_models(request: Request) -> Response:
    model = _model_info(request.app.state.engine)
    page = {"data": [model], "has_more": False, "first_id": model["id"], "last_id": model["id"]}
    return JSONResponse(page)


async def get_model(request: Request) -> Response:
    engine: EngineClient = request.app.state.engine
    model_id = request.path_params["model_id"]
    if model_id != engine.model.model_id:
        raise model_not_found(model_id, engine.model.model_id)
    return JSONResponse(_model_info(engine))


def _model_info(engine: EngineClient) -> dict[str, Any]:
    """Anthropic's model object; `created_at` is when the server loaded it (no release date)."""
    loaded = engine.model
    created_at = datetime.fromtimestamp(loaded.created, timezone.utc)
    return {
        "type": "model",
        "id": loaded.model_id,
        "display_name": loaded.model_id,
        "created_at": created_at.isoformat().replace("+00:00", "Z"),
        "lifecycle": "active",
        "max_input_tokens": loaded.context_window,
        "max_tokens": loaded.context_window,
    }


# Errors on these paths leave in Anthropic's dialect: http/app.py gives the table to the renderer.
ROUTES = [
    Route("/v1/messages", messages, methods=["POST"]),
    Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
]
DIALECT = ANTHROPIC
