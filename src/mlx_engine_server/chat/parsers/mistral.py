"""Mistral: `[TOOL_CALLS]` then a JSON list of calls, or (newer templates) `name[ARGS]{...}`;
the block runs to the end of the answer. Parsed by mlx-lm's own Mistral parser."""

from __future__ import annotations

from mlx_lm.tool_parsers import mistral as mlx_lm_mistral

from .types import ParsedCall, ToolCallFormat, calls_from_json


def parse(body: str) -> list[ParsedCall]:
    return calls_from_json(mlx_lm_mistral.parse_tool_call(body.strip()), ("arguments",))


FORMAT = ToolCallFormat(name="mistral", starts=("[TOOL_CALLS]",), end="", parse=parse)
