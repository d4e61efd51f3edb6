"""The fallback format for models whose template does not render tools (chat/tool_fallback.py):
the whole answer is `{"tool_calls": [{"name": ..., "arguments": {...}}, ...]}`."""

from __future__ import annotations

import json

from .types import ParsedCall, ToolCallFormat, calls_from_json


def parse(body: str) -> list[ParsedCall]:
    payload = json.loads(body.strip())
    if not isinstance(payload, dict) or set(payload) != {"tool_calls"}:
        raise ValueError("not a tool_calls object")
    calls = calls_from_json(payload["tool_calls"], ("arguments",))
    if not calls:
        raise ValueError("no tool call in the block")
    return calls


FORMAT = ToolCallFormat(
    name="generic",
    starts=(),
    end="",
    parse=parse,
    leading_json=True,
    call_opener='{"tool_calls"',
)
