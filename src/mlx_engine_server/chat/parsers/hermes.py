"""Hermes / Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one call a block.

mlx-lm's `json_tools` parser reads the same blocks; ours also takes arguments written as a JSON
string and the `parameters` key some fine-tunes use.
"""

from __future__ import annotations

import json

from .types import ParsedCall, ToolCallFormat, calls_from_json


def parse(body: str) -> list[ParsedCall]:
    return calls_from_json(json.loads(body.strip()), ("arguments", "parameters"))


FORMAT = ToolCallFormat(name="hermes", starts=("<tool_call>",), end="</tool_call>", parse=parse)
