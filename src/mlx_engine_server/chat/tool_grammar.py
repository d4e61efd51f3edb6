"""Grammars for tool calls: forced ones (tool_choice "required" or a named function), or a call
as one alternative beside another answer (a response_format's JSON, the fallback's plain text).

A pure function from the offered tools to an llguidance Lark grammar (each function's call
embedded as a `%json` schema: the name a constant, the arguments the function's own schema).
The engine enforces it token by token, so a call is a well-formed call to an offered function
whose arguments match its schema. Families with a grammar here are written in their own format;
the others in the Hermes `<tool_call>` form, which is then parsed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .parsers import ToolCallFormat
from .parsers import hermes as hermes_format
from .structured import check_json_schema
from .tools import ToolPolicy, ToolSpec

# The compact JSON these families' templates render, so a forced call looks like a natural one.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
REGEX_SPECIAL = set("\\.+*?()|[]{}^$#&-~/")


@dataclass(frozen=True)
class FamilyShape:
    arguments_key: str
    calls_open: str  # markers may be special tokens: see _marker
    call_open: str
    call_close: str
    separator: str
    calls_close: str = ""


SHAPES = {
    "hermes": FamilyShape("arguments", "", "<tool_call>\n", "\n</tool_call>", "\n"),
    "llama3": FamilyShape("parameters", "", "", "", "; "),
    "mistral": FamilyShape("arguments", "[TOOL_CALLS][", "", "", ", ", "]"),
}
# The fallback's `{"tool_calls": [...]}` is one JSON schema, not markers around calls: an answer
# that is JSON too (a response_format) can then be its alternative (llguidance cannot choose
# between a literal and a `%json` that both open with "{").
GENERIC = "generic"
REF_PREFIXES = ("#/$defs/", "#/definitions/")


@dataclass(frozen=True)
class ThinkingShape:
    """A thinking block allowed before the call; `opened`: the prompt already opened it."""

    start: str
    end: str
    opened: bool


def forced_format(model_format: ToolCallFormat | None) -> ToolCallFormat:
    """The format a forced call is written in: the model's own when a grammar exists for it."""
    if model_format is not None and model_format.name in (*SHAPES, GENERIC):
        return model_format
    return hermes_format.FORMAT


def tool_call_grammar(
    policy: ToolPolicy,
    family: str,
    *,
    thinking: ThinkingShape | None = None,
    special_ids: Mapping[str, int] | None = None,
    answer: str | None = None,
) -> str:
    """Lark text for `policy`'s call(s) in `family`'s format (see forced_format); `answer`, a
    Lark expression, is the other answer allowed instead of calls (None: a call is forced)."""
    specials = special_ids or {}
    tools = [tool for tool in policy.offered if policy.forced_name in (None, tool.name)]
    reply = "calls" if answer is None else "(calls | answer)"
    lines = [f"start: {_thinking_prefix(thinking, specials)}{reply}"]
    if family == GENERIC:
        lines.append(f"calls: %json {json.dumps(generic_calls_schema(tools, policy.parallel))}")
    else:
        lines += _marked_calls(tools, SHAPES.get(family, SHAPES["hermes"]), policy, specials)
    if answer is not None:
        lines.append(f"answer: {answer}")
    if thinking is not None:
        lines += ["ws: /[ \\t\\r\\n]*/", _thinking_rule(thinking.end, specials)]
    return "\n".join(lines) + "\n"


def _marked_calls(
    tools: list[ToolSpec], shape: FamilyShape, policy: ToolPolicy, specials: Mapping[str, int]
) -> list[str]:
    block = f"{_marker(shape.call_open, specials)} call {_marker(shape.call_close, specials)}"
    repeat = f" ({json.dumps(shape.separator)} call_block)*" if policy.parallel else ""
    return [
        f"calls: {_marker(shape.calls_open, specials)} call_block{repeat} "
        f"{_marker(shape.calls_close, specials)}",
        f"call_block: {block}",
        "call: " + " | ".join(f"fn_{index}" for index in range(len(tools))),
        *(
            f"fn_{index}: %json {json.dumps(call_schema(tool, shape.arguments_key))}"
            for index, tool in enumerate(tools)
        ),
    ]


def generic_calls_schema(tools: list[ToolSpec], parallel: bool) -> dict[str, Any]:
    """`{"tool_calls": [call, ...]}` with each call one of `tools`; their `$defs` gathered at
    the root, each renamed after its function so that two functions' names cannot clash."""
    variants, defs = [], {}
    for index, tool in enumerate(tools):
        schema = call_schema(tool, "arguments")
        schema.pop("x-guidance")
        prefix = f"fn{index}_"
        for key in ("$defs", "definitions"):
            for name, definition in schema.pop(key, {}).items():
                defs[prefix + name] = _renamed_refs(definition, prefix)
        variants.append(_renamed_refs(schema, prefix))
    calls: dict[str, Any] = {"type": "array", "items": {"anyOf": variants}, "minItems": 1}
    if not parallel:
        calls["maxItems"] = 1
    return {
        "type": "object",
        "properties": {"tool_calls": calls},
        "required": ["tool_calls"],
        "additionalProperties": False,
        "x-guidance": JSON_STYLE,
        **({"$defs": defs} if defs else {}),
    }


def _renamed_refs(node: Any, prefix: str) -> Any:
    if isinstance(node, list):
        return [_renamed_refs(item, prefix) for item in node]
    if not isinstance(node, dict):
        return node
    renamed = {key: _renamed_refs(value, prefix) for key, value in node.items()}
    ref = node.get("$ref")
    if isinstance(ref, str):
        for start in REF_PREFIXES:
            if ref.startswith(start):
                renamed["$ref"] = "#/$defs/" + prefix + ref[len(start) :]
    return renamed


def call_schema(tool: ToolSpec, arguments_key: str) -> dict[str, Any]:
    """`{"name": <const>, <arguments_key>: <the function's schema>}`, with the function's
    `$defs` lifted to the root so its `#/$defs/...` references still resolve."""
    parameters = dict(tool.parameters)
    lifted: dict[str, Any] = {
        key: parameters.pop(key) for key in ("$defs", "definitions") if key in parameters
    }
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, arguments_key: parameters},
        "required": ["name", arguments_key],
        "additionalProperties": False,
        "x-guidance": JSON_STYLE,
        **lifted,
    }


def check_tool_schemas(policy: ToolPolicy, tool_indexes: Mapping[str, int]) -> None:
    """A schema the grammar engine cannot compile is the client's to fix: 400 naming it."""
    for tool in policy.offered:
        if policy.forced_name not in (None, tool.name):
            continue
        check_json_schema(
            call_schema(tool, "arguments"),
            param=f"tools[{tool_indexes[tool.name]}].function.parameters",
        )


def _thinking_prefix(thinking: ThinkingShape | None, specials: Mapping[str, int]) -> str:
    if thinking is None:
        return ""
    if thinking.opened:
        return "thinking ws "
    return f"({_marker(thinking.start, specials)} thinking ws)? "


def _thinking_rule(end: str, specials: Mapping[str, int]) -> str:
    """Any text up to the first end marker (a special token cannot occur inside text)."""
    if end in specials:
        return f"thinking: /(?s:.*)/ <[{specials[end]}]>"
    return f"thinking[lazy]: /(?s:.*){_escape_regex(end)}/"


def _marker(text: str, specials: Mapping[str, int]) -> str:
    """A literal in the grammar; a marker that is one special token is named by its id."""
    if not text:
        return ""
    for special, token_id in specials.items():
        if text.startswith(special):
            rest = _marker(text[len(special) :], specials)
            return f"<[{token_id}]> {rest}".strip()
    return json.dumps(text)


def _escape_regex(text: str) -> str:
    return "".join(f"\\{char}" if char in REGEX_SPECIAL else char for char in text)
