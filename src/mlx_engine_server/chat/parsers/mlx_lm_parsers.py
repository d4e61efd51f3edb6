"""The other families mlx-lm parses (Qwen3-Coder XML, GLM, Kimi, MiniMax, pythonic, Gemma 4 ...),
used as mlx-lm ships them: its markers, its `parse_tool_call`."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import mlx_lm.tool_parsers

from .types import ParsedCall, ToolCallFormat, calls_from_json

# mlx-lm parser types whose format one of our modules reads (with a few more variants).
MLX_LM_TO_OURS = {"json_tools": "hermes", "mistral": "mistral"}


def mlx_lm_parser_names() -> list[str]:
    return sorted(module.name for module in pkgutil.iter_modules(mlx_lm.tool_parsers.__path__))


def mlx_lm_format(name: str) -> ToolCallFormat:
    if name not in mlx_lm_parser_names():
        raise ValueError(f"unknown tool-call parser {name!r}")
    module = importlib.import_module(f"{mlx_lm.tool_parsers.__name__}.{name}")
    return _format(name, module.parse_tool_call, module.tool_call_start, module.tool_call_end)


def tokenizer_format(tokenizer: Any, name: str) -> ToolCallFormat:
    """The parser mlx-lm attached to the tokenizer when it loaded the model."""
    return _format(
        name, tokenizer.tool_parser, tokenizer.tool_call_start, tokenizer.tool_call_end or ""
    )


def _format(name: str, parse_tool_call: Any, start: str, end: str) -> ToolCallFormat:
    def parse(body: str) -> list[ParsedCall]:
        return calls_from_json(parse_tool_call(body), ("arguments",))

    return ToolCallFormat(name=name, starts=(start,), end=end, parse=parse)
