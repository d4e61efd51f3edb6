"""The fallback format for models whose template does not render tools (chat/tool_fallback.py):
the whole answer is `{"tool_calls": [{"name": ..., "arguments": {...}}, ...]}`."""

from __future__ import annotations

import json
import re

from .types import ParsedCall, ToolCallFormat, calls_from_json


def parse(body: str) -> list[ParsedCall]:
    payload = json.loads(body.strip())
    if not isinstance(payload, dict) or set(payload) != {"tool_calls"}:
        raise ValueError("not a tool_calls object")
    calls = calls_from_json(payload["tool_calls"], ("arguments",))
    if not calls:
        raise ValueError("no tool call in the block")
    return calls


_OPENING = re.compile(r'\s*\{\s*"tool_calls"\s*:\s*\[\s*')
_SEPARATOR = re.compile(r"\s*,\s*")
_DECODER = json.JSONDecoder()


def complete_calls(body: str) -> list[ParsedCall]:
    """The calls of a block cut off by max_tokens that were written in full before the cut."""
    opening = _OPENING.match(body)
    if opening is None:
        return []
    items: list[object] = []
    position = opening.end()
    while True:
        try:
            item, position = _DECODER.raw_decode(body, position)
        except ValueError:
            break  # the call max_tokens cut off
        items.append(item)
        separator = _SEPARATOR.match(body, position)
        if separator is None:
            break
        position = separator.end()
    return calls_from_json(items, ("arguments",)) if items else []


FORMAT = ToolCallFormat(
    name="generic",
    starts=(),
    end="",
    parse=parse,
    leading_json=True,
    call_opener='{"tool_calls"',
    complete_calls=complete_calls,
)
