"""Gemma (2/3) `tool_code` blocks: a fenced block of Python calls, `[get_weather(city="Paris")]`
or `get_weather(city="Paris")`, maybe wrapped in `print(...)`. mlx-lm's pythonic parser reads the
calls."""

from __future__ import annotations

from mlx_lm.tool_parsers import pythonic

from .types import ParsedCall, ToolCallFormat, calls_from_json


def parse(body: str) -> list[ParsedCall]:
    code = body.strip()
    if code.startswith("print(") and code.endswith(")"):
        code = code[len("print(") : -1].strip()
    if not code.startswith("["):
        code = f"[{code}]"
    return calls_from_json(pythonic.parse_tool_call(code), ("arguments",))


FORMAT = ToolCallFormat(name="gemma", starts=("```tool_code",), end="```", parse=parse)
