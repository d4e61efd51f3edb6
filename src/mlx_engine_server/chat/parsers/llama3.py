"""Llama 3.x JSON tool calls: the whole answer is `{"name": ..., "parameters": {...}}`,
sometimes after `<|python_tag|>`; several calls are separated by `;`."""

from __future__ import annotations

import json

from .types import ParsedCall, ToolCallFormat, calls_from_json

SEPARATORS = " \t\r\n;"


def parse(body: str) -> list[ParsedCall]:
    decoder = json.JSONDecoder()
    calls: list[ParsedCall] = []
    position = 0
    while (position := _skip(body, position)) < len(body):
        payload, position = decoder.raw_decode(body, position)
        calls.extend(calls_from_json(payload, ("parameters", "arguments")))
    if not calls:
        raise ValueError("no tool call in the block")
    return calls


def _skip(text: str, position: int) -> int:
    while position < len(text) and text[position] in SEPARATORS:
        position += 1
    return position


FORMAT = ToolCallFormat(
    name="llama3", starts=("<|python_tag|>",), end="", parse=parse, leading_json=True
)
