"""Tool-call formats, one module per model family (mlx-lm's convention), and how one is chosen.

A format names the markers around a block of calls and parses a block's body into calls; a body
it cannot parse raises, and the block is then returned to the client as plain content.
"""

from __future__ import annotations

from typing import Any

from . import gemma, generic, hermes, llama3, mistral
from .mlx_lm_parsers import MLX_LM_TO_OURS, mlx_lm_format, mlx_lm_parser_names, tokenizer_format
from .types import ParsedCall, ToolCallFormat

__all__ = ["ParsedCall", "ToolCallFormat", "known_tool_call_parsers", "resolve_tool_call_format"]


OURS: dict[str, ToolCallFormat] = {
    format_.name: format_
    for format_ in (hermes.FORMAT, llama3.FORMAT, mistral.FORMAT, gemma.FORMAT, generic.FORMAT)
}

# Template text that tells a family apart when mlx-lm does not recognise the template.
TEMPLATE_HINTS = (
    ("[TOOL_CALLS]", "mistral"),
    ("tool_code", "gemma"),
    ("<|python_tag|>", "llama3"),
    ("<tool_call>", "hermes"),
)


def known_tool_call_parsers() -> list[str]:
    """Every value --tool-call-parser accepts."""
    return ["auto", "none", *OURS, *(name for name in mlx_lm_parser_names() if name not in OURS)]


def resolve_tool_call_format(setting: str, tokenizer: Any) -> ToolCallFormat | None:
    """The format to parse this model's output with; None: tool calls are not parsed."""
    if setting == "none":
        return None
    if setting in OURS:
        return OURS[setting]
    if setting != "auto":
        return mlx_lm_format(setting)
    return _detect(tokenizer)


def _detect(tokenizer: Any) -> ToolCallFormat | None:
    mlx_lm_type = getattr(tokenizer, "init_kwargs", {}).get("tool_parser_type")
    if mlx_lm_type in MLX_LM_TO_OURS:
        return OURS[MLX_LM_TO_OURS[mlx_lm_type]]
    if mlx_lm_type is not None:
        return tokenizer_format(tokenizer, mlx_lm_type)
    template = str(getattr(tokenizer, "chat_template", None) or "")
    for hint, name in TEMPLATE_HINTS:
        if hint in template:
            return OURS[name]
    # A template that renders tools but shows no known call format: the most common one.
    return OURS["hermes"] if "tools" in template else None
