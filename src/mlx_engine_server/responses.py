"""OpenAI response bodies and stream chunks, built from the engine's plain events."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from .chat.output import ParsedOutput, ToolCallOut
from .engine import Usage


@dataclass(frozen=True)
class ResponseHeader:
    """What every body and chunk of one response repeats."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, prefix: str, model: str) -> ResponseHeader:
        return cls(id=f"{prefix}-{uuid.uuid4().hex}", created=int(time.time()), model=model)


def usage_body(usage: Usage) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }
    if usage.summary is not None:  # extension: the part of the counts above the summary took
        body["summary_usage"] = usage_body(usage.summary)
    return body


def chat_completion(
    head: ResponseHeader, output: ParsedOutput, finish: str, usage: Usage
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": output.content}
    if output.reasoning:
        message.update(reasoning_fields(output.reasoning))
    if output.tool_calls:
        message["content"] = output.content or None  # as OpenAI: null beside tool calls
        message["tool_calls"] = [_tool_call_body(call) for call in output.tool_calls]
    finish = chat_finish_reason(finish, made_tool_calls=bool(output.tool_calls))
    return {
        "id": head.id,
        "object": "chat.completion",
        "created": head.created,
        "model": head.model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": usage_body(usage),
    }


def chat_finish_reason(finish: str, *, made_tool_calls: bool) -> str:
    return "tool_calls" if made_tool_calls and finish == "stop" else finish


def reasoning_fields(text: str) -> dict[str, str]:
    """Clients disagree on the name (vLLM/DeepSeek vs OpenRouter/Ollama): send both."""
    return {"reasoning_content": text, "reasoning": text}


def _tool_call_body(call: ToolCallOut) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def tool_call_deltas(call: ToolCallOut) -> list[dict[str, Any]]:
    """A call as OpenAI streams it: id, type and name first, then the arguments."""
    opening = {
        "index": call.index,
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": ""},
    }
    arguments = {"index": call.index, "function": {"arguments": call.arguments}}
    return [{"tool_calls": [opening]}, {"tool_calls": [arguments]}]


def chat_chunk(
    head: ResponseHeader,
    delta: dict[str, Any],
    finish: str | None = None,
    *,
    with_usage_field: bool = False,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": head.id,
        "object": "chat.completion.chunk",
        "created": head.created,
        "model": head.model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }
    if with_usage_field:
        chunk["usage"] = None
    return chunk


def chat_usage_chunk(head: ResponseHeader, usage: Usage) -> dict[str, Any]:
    return {
        "id": head.id,
        "object": "chat.completion.chunk",
        "created": head.created,
        "model": head.model,
        "choices": [],
        "usage": usage_body(usage),
    }


def text_completion(head: ResponseHeader, text: str, finish: str, usage: Usage) -> dict[str, Any]:
    return {
        "id": head.id,
        "object": "text_completion",
        "created": head.created,
        "model": head.model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
        "usage": usage_body(usage),
    }


def text_chunk(
    head: ResponseHeader, text: str, finish: str | None = None, *, with_usage_field: bool = False
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": head.id,
        "object": "text_completion",
        "created": head.created,
        "model": head.model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
    }
    if with_usage_field:
        chunk["usage"] = None
    return chunk


def text_usage_chunk(head: ResponseHeader, usage: Usage) -> dict[str, Any]:
    return {
        "id": head.id,
        "object": "text_completion",
        "created": head.created,
        "model": head.model,
        "choices": [],
        "usage": usage_body(usage),
    }
