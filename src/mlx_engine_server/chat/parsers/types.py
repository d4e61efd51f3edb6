"""What every tool-call format provides."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: Any  # a dict when well-formed; anything else makes the block plain content


@dataclass(frozen=True)
class ToolCallFormat:
    """How one family writes tool calls.

    `starts` open a block of calls; `end` closes it ("" = the block runs to the end of the
    output). `leading_json`: output that begins with a JSON object is a block too (Llama 3);
    `call_opener`: how such a call begins, to tell an unfinished call from other JSON.
    `parse` turns a block's body into calls and raises on anything malformed;
    `complete_calls`, for a format that writes several calls in one block, the calls written in
    full in a block that max_tokens cut off (the cut-off call itself is dropped).
    """

    name: str
    starts: tuple[str, ...]
    end: str
    parse: Callable[[str], list[ParsedCall]]
    leading_json: bool = False
    call_opener: str = '{"name"'
    complete_calls: Callable[[str], list[ParsedCall]] | None = None

    def opens_call(self, body: str) -> bool:
        """Could `body` (the text after a block's start, maybe cut short) be a call?"""
        compact = "".join(body.split())
        opener = self.call_opener
        return compact.startswith(opener) or opener.startswith(compact)


def calls_from_json(payload: Any, arguments_keys: tuple[str, ...]) -> list[ParsedCall]:
    """`{"name", "arguments"}` objects (or a list of them) as calls; arguments given as a JSON
    string are decoded, as some templates render them that way."""
    items = payload if isinstance(payload, list) else [payload]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValueError("a tool call needs a name")
        key = next((key for key in arguments_keys if key in item), None)
        arguments = item[key] if key else {}
        if isinstance(arguments, str):
            arguments = json.loads(arguments)
        calls.append(ParsedCall(item["name"], arguments))
    return calls
