"""Anthropic Messages answers: the `message` body and its stream of events.

One builder turns the split output (reasoning, content, tool calls) into content blocks for both:
a whole answer is the blocks after every part was added, a stream is the events on the way.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from typing import Any

from ...chat.output import Content, Part, Reasoning, ToolCallOut
from ...engine import Finished, TokenLogprob, Usage
from ...errors import APIError, ErrorDialect, OverloadedError

# Our parameter names, as the Anthropic request spells them, for error messages: the first
# prefix that matches is replaced.
ANTHROPIC_PARAMS = (
    ("response_format.json_schema.schema", "output_config.format.schema"),
    ("response_format", "output_config.format"),
    ("stop", "stop_sequences"),
    ("chat_template_kwargs", "thinking"),
    ("reasoning_effort", "output_config.effort"),
)
# Inside tools[i]: OpenAI's function fields, Anthropic's names.
ANTHROPIC_TOOL_FIELDS = ((".function.parameters", ".input_schema"), (".function.", "."))

# Anthropic's type for each status we send; a full queue is Anthropic's 529 "overloaded".
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    431: "request_too_large",
    500: "api_error",
    503: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}
OVERLOADED = 529


def error_status(error: APIError) -> int:
    """A full queue is the server's load (529); a key over its rate limit stays a 429."""
    return OVERLOADED if isinstance(error, OverloadedError) else error.status_code


def _message_naming_param(error: APIError) -> str:
    if not error.param:
        return error.message
    param = anthropic_param(error.param)
    if f"'{error.param}'" in error.message:  # named as a field, not a word ("render tools")
        return error.message.replace(f"'{error.param}'", f"'{param}'")
    return f"{param}: {error.message}"


def anthropic_param(param: str) -> str:
    """A chat request's parameter name as the Anthropic request spells it."""
    head = re.match(r"[A-Za-z_.]*", param).group()  # type: ignore[union-attr]
    for ours, theirs in ANTHROPIC_PARAMS:
        if head == ours or head.startswith(ours + "."):
            return theirs + param[len(ours) :]
    if param.startswith("tools["):
        for ours, theirs in ANTHROPIC_TOOL_FIELDS:
            param = param.replace(ours, theirs)
    return param


def error_body(error: APIError) -> dict[str, Any]:
    kind = ERROR_TYPES.get(error_status(error), "api_error")
    return {"type": "error", "error": {"type": kind, "message": _message_naming_param(error)}}


ANTHROPIC = ErrorDialect(body=error_body, status=error_status)


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def tool_use_id(call_id: str) -> str:
    """Our call ids (call_...) spelled the way Anthropic's look (toolu_...)."""
    return "toolu_" + call_id.removeprefix("call_")


def stop_reason(finished: Finished, *, made_tool_calls: bool) -> str:
    if finished.finish_reason == "length":
        return "max_tokens"
    if made_tool_calls:
        return "tool_use"
    return "stop_sequence" if finished.stop_sequence is not None else "end_turn"


def usage_body(usage: Usage) -> dict[str, int]:
    """Anthropic counts prompt tokens read from the (prefix) cache apart from the others."""
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens,
        "output_tokens": usage.completion_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


class ContentBlocks:
    """Content blocks built part by part; `add` and `close` return the stream events."""

    def __init__(self, *, omit_thinking: bool = False) -> None:
        self.blocks: list[dict[str, Any]] = []
        self._open: str | None = None  # type of the block still receiving deltas
        self._omit_thinking = omit_thinking

    def add(self, parts: list[Part]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for part in parts:
            if isinstance(part, Reasoning):
                text = "" if self._omit_thinking else part.text
                events.extend(self._extend("thinking", text))
            elif isinstance(part, Content):
                events.extend(self._extend("text", part.text))
            else:
                events.extend(self._tool_use(part))
        return events

    def close(self) -> list[dict[str, Any]]:
        if self._open is None:
            return []
        self._open = None
        return [{"type": "content_block_stop", "index": len(self.blocks) - 1}]

    def _extend(self, kind: str, text: str) -> list[dict[str, Any]]:
        events = []
        if self._open != kind:
            events.extend(self.close())
            block = {"type": "thinking", "thinking": "", "signature": ""}
            if kind == "text":
                block = {"type": "text", "text": ""}
            events.append(self._start(block))
            self._open = kind
        if text:
            self.blocks[-1][kind] += text
            delta = {"type": f"{kind}_delta", kind: text}
            index = len(self.blocks) - 1
            events.append({"type": "content_block_delta", "index": index, "delta": delta})
        return events

    def _tool_use(self, call: ToolCallOut) -> list[dict[str, Any]]:
        events = self.close()
        block = {"type": "tool_use", "id": tool_use_id(call.id), "name": call.name, "input": {}}
        events.append(self._start(block))
        block["input"] = json.loads(call.arguments)
        delta = {"type": "input_json_delta", "partial_json": call.arguments}
        index = len(self.blocks) - 1
        events.append({"type": "content_block_delta", "index": index, "delta": delta})
        events.append({"type": "content_block_stop", "index": index})
        return events

    def _start(self, block: dict[str, Any]) -> dict[str, Any]:
        self.blocks.append(block)
        index = len(self.blocks) - 1
        return {"type": "content_block_start", "index": index, "content_block": dict(block)}


def message_body(
    message_id: str,
    model: str,
    blocks: list[dict[str, Any]],
    finished: Finished,
    usage: Usage,
    *,
    made_tool_calls: bool,
) -> dict[str, Any]:
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": blocks,
        "stop_reason": stop_reason(finished, made_tool_calls=made_tool_calls),
        "stop_sequence": finished.stop_sequence,
        "usage": usage_body(usage),
    }


class MessageStream:
    """The event sequence of one streamed message, as the `anthropic` SDK reads it."""

    def __init__(
        self, model: str, prompt_tokens: int, summary: Usage | None, *, omit_thinking: bool
    ) -> None:
        self.message_id = new_message_id()
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.summary = summary  # a context summary made for this request counts in its usage
        self.blocks = ContentBlocks(omit_thinking=omit_thinking)

    def opening(self) -> list[dict[str, Any]]:
        # What the prefix cache holds is known only at the end: message_delta corrects it.
        usage = usage_body(Usage(self.prompt_tokens, 0))
        message: dict[str, Any] = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        }
        return [{"type": "message_start", "message": message}, {"type": "ping"}]

    def parts(
        self, parts: list[Part], logprobs: Sequence[TokenLogprob] = ()
    ) -> list[dict[str, Any]]:
        return self.blocks.add(parts)  # Anthropic's API has no logprobs

    def closing(self, finished: Finished, made_tool_calls: bool) -> list[dict[str, Any]]:
        delta = {
            "stop_reason": stop_reason(finished, made_tool_calls=made_tool_calls),
            "stop_sequence": finished.stop_sequence,
        }
        return [
            *self.blocks.close(),
            {
                "type": "message_delta",
                "delta": delta,
                "usage": usage_body(finished.usage.with_summary(self.summary)),
            },
            {"type": "message_stop"},
        ]

    def failure(self, error: APIError) -> list[dict[str, Any]]:
        return [error_body(error)]
