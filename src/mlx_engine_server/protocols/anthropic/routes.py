"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API on the chat pipeline.

Errors on these routes leave in Anthropic's shape (`{"type": "error", "error": {"type",
"message"}}`); every other route keeps OpenAI's.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from sse_starlette import ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ...chat.output import OutputSplitter
from ...engine import Finished
from ...engine.messages import FinishReason
from ...errors import APIError, InternalError, MethodNotAllowedError
from ...http.body import read_model, validate_model
from ...http.sse import GenerationStream
from ...pipeline.admission import collect
from ...pipeline.events import named_events
from ...pipeline.prepare import count_chat_tokens, summary_usage
from ...pipeline.run import ChatRun, start_chat
from ..openai.types import ChatCompletionRequest
from .render import (
    ContentBlocks,
    MessageStream,
    error_body,
    error_status,
    message_body,
    new_message_id,
)
from .translate import chat_fields, generation_fields
from .types import CountTokensRequest, MessagesRequest

logger = logging.getLogger(__name__)

Endpoint = Callable[[Request], Awaitable[Response]]


def error_response(error: APIError) -> JSONResponse:
    headers = {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(error.retry_after_s)
    if isinstance(error, InternalError):
        headers["x-should-retry"] = "false"
    return JSONResponse(error_body(error), status_code=error_status(error), headers=headers)


def anthropic_errors(endpoint: Endpoint) -> Endpoint:
    """Any failure of `endpoint`, a bug included, as Anthropic's error JSON."""

    async def guarded(request: Request) -> Response:
        try:
            return await endpoint(request)
        except APIError as error:
            return error_response(error)
        except Exception:
            logger.exception("unhandled error on %s %s", request.method, request.url.path)
            return error_response(InternalError("The server hit an internal error; see its log."))

    return guarded


class AnthropicRoute(Route):
    """A route whose wrong-method answer (405) is Anthropic-shaped as well."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.methods and scope["method"] not in self.methods:
            error = MethodNotAllowedError(f"Method {scope['method']} is not allowed on this path")
            response = error_response(error)
            response.headers["Allow"] = ", ".join(sorted(self.methods))
            await response(scope, receive, send)
            return
        await super().handle(scope, receive, send)


async def messages(request: Request) -> Response:
    body = await read_model(request, MessagesRequest)
    chat = validate_model(ChatCompletionRequest, generation_fields(body))
    run = await start_chat(request, chat)
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
    blocks.add(splitter.finish())
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
    return JSONResponse({"input_tokens": count_chat_tokens(request, chat)})


ROUTES = [
    AnthropicRoute("/v1/messages", anthropic_errors(messages), methods=["POST"]),
    AnthropicRoute("/v1/messages/count_tokens", anthropic_errors(count_tokens), methods=["POST"]),
]
