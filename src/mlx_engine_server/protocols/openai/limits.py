"""Request limits: how much a client may send, each refusal an OpenAI-shaped 400 or 413.

The values are settings (see the limits table of docs/security.md); these checks run after the
body has been parsed and validated, before any tokenization.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...errors import InvalidRequestError
from .types import ChatCompletionRequest, CompletionRequest


@dataclass(frozen=True)
class RequestLimits:
    max_body_bytes: int = 32 * 1024 * 1024
    max_json_depth: int = 64
    max_messages: int = 2048
    max_stop_sequences: int = 16
    max_stop_chars: int = 256
    max_logit_bias: int = 1024


def check_json_depth(data: Any, max_depth: int, raw: bytes) -> None:
    """Containers nested deeper than max_depth are refused; walked without recursion."""
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return  # too few brackets to nest that deep: skip the walk
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value
        if depth > max_depth:
            raise InvalidRequestError(
                f"The JSON body is nested deeper than {max_depth} levels.", code="nesting_too_deep"
            )
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


def check_request_limits(
    body: ChatCompletionRequest | CompletionRequest, limits: RequestLimits
) -> None:
    if isinstance(body, ChatCompletionRequest):
        _check_length("messages", len(body.messages), limits.max_messages)
    stops = body.stop_list()
    if not isinstance(body.stop, str):
        _check_length("stop", len(stops), limits.max_stop_sequences)
    for index, stop in enumerate(stops):
        if len(stop) > limits.max_stop_chars:
            name = "stop" if isinstance(body.stop, str) else f"stop[{index}]"
            raise InvalidRequestError(
                f"Invalid '{name}': string too long. Expected a string with maximum length "
                f"{limits.max_stop_chars}, but got a string with length {len(stop)} instead.",
                param=name,
                code="string_above_max_length",
            )
    if body.logit_bias is not None and len(body.logit_bias) > limits.max_logit_bias:
        raise InvalidRequestError(
            f"Invalid 'logit_bias': at most {limits.max_logit_bias} tokens may be biased, "
            f"got {len(body.logit_bias)}.",
            param="logit_bias",
            code="object_above_max_size",
        )


def _check_length(name: str, length: int, limit: int) -> None:
    if length > limit:
        raise InvalidRequestError(
            f"Invalid '{name}': array too long. Expected an array with maximum length {limit}, "
            f"but got an array with length {length} instead.",
            param=name,
            code="array_above_max_length",
        )
