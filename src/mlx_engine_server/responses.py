"""OpenAI response bodies and stream chunks, built from the engine's plain events."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

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


def chat_completion(head: ResponseHeader, text: str, finish: str, usage: Usage) -> dict[str, Any]:
    message = {"role": "assistant", "content": text}
    return {
        "id": head.id,
        "object": "chat.completion",
        "created": head.created,
        "model": head.model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": usage_body(usage),
    }


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
