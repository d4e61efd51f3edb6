"""OpenAI response bodies and stream chunks, built from the engine's plain events."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from ...chat.output import ParsedOutput, ToolCallOut
from ...engine import TokenLogprob, Usage
from ...pipeline.admission import ChoiceResult


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


def token_text(token: bytes) -> str:
    return token.decode("utf-8", errors="replace")


def chat_logprobs(logprobs: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> dict[str, Any]:
    """`choices[].logprobs` of chat completions: one entry per generated token."""
    content = [
        {
            "token": token_text(entry.token_bytes),
            "logprob": entry.logprob,
            "bytes": list(entry.token_bytes),
            "top_logprobs": [
                {
                    "token": token_text(top.token_bytes),
                    "logprob": top.logprob,
                    "bytes": list(top.token_bytes),
                }
                for top in entry.top
            ],
        }
        for entry in logprobs
    ]
    return {"content": content, "refusal": None}


def text_logprobs(
    logprobs: list[TokenLogprob] | tuple[TokenLogprob, ...], offset: int = 0
) -> dict[str, Any]:
    """The legacy completions shape; `offset` is where the first token's text starts."""
    tokens = [token_text(entry.token_bytes) for entry in logprobs]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [entry.logprob for entry in logprobs],
        "top_logprobs": [
            {token_text(top.token_bytes): top.logprob for top in entry.top} for entry in logprobs
        ],
        "text_offset": offsets,
    }


def chat_completion(
    head: ResponseHeader,
    choices: list[ChoiceResult],
    outputs: list[ParsedOutput],
    usage: Usage,
    *,
    with_logprobs: bool,
) -> dict[str, Any]:
    """`outputs[i]` is choice i's text split into content, reasoning and tool calls."""
    return {
        "id": head.id,
        "object": "chat.completion",
        "created": head.created,
        "model": head.model,
        "choices": [
            _chat_choice(index, choice, output, with_logprobs=with_logprobs)
            for index, (choice, output) in enumerate(zip(choices, outputs, strict=True))
        ],
        "usage": usage_body(usage),
    }


def _chat_choice(
    index: int, choice: ChoiceResult, output: ParsedOutput, *, with_logprobs: bool
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": output.content}
    if output.reasoning:
        message.update(reasoning_fields(output.reasoning))
    if output.tool_calls:
        message["content"] = output.content or None  # as OpenAI: null beside tool calls
        message["tool_calls"] = [_tool_call_body(call) for call in output.tool_calls]
    return {
        "index": index,
        "message": message,
        "finish_reason": chat_finish_reason(
            choice.finish_reason, made_tool_calls=bool(output.tool_calls)
        ),
        "logprobs": chat_logprobs(choice.logprobs) if with_logprobs else None,
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


def text_completion(
    head: ResponseHeader,
    choices: list[ChoiceResult],
    usage: Usage,
    *,
    with_logprobs: bool,
    echoes: list[str] | None = None,
) -> dict[str, Any]:
    return {
        "id": head.id,
        "object": "text_completion",
        "created": head.created,
        "model": head.model,
        "choices": [
            {
                "index": index,
                "text": (echoes[index] if echoes else "") + choice.text,
                "finish_reason": choice.finish_reason,
                "logprobs": text_logprobs(choice.logprobs) if with_logprobs else None,
            }
            for index, choice in enumerate(choices)
        ],
        "usage": usage_body(usage),
    }


def chat_chunk(
    head: ResponseHeader,
    choice: dict[str, Any],
    *,
    with_usage_field: bool = False,
) -> dict[str, Any]:
    """`choice`: index, delta, finish_reason and logprobs of one choice."""
    chunk: dict[str, Any] = {
        "id": head.id,
        "object": "chat.completion.chunk",
        "created": head.created,
        "model": head.model,
        "choices": [choice],
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


def text_chunk(
    head: ResponseHeader, choice: dict[str, Any], *, with_usage_field: bool = False
) -> dict[str, Any]:
    """`choice`: index, text, finish_reason and logprobs of one choice."""
    chunk: dict[str, Any] = {
        "id": head.id,
        "object": "text_completion",
        "created": head.created,
        "model": head.model,
        "choices": [choice],
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
