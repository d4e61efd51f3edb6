"""Structured output: `response_format` as a llguidance grammar (Lark syntax) the engine enforces.

Schemas are checked here, before the request is queued, so an unsupported keyword or a broken
`$ref` is a 400 naming the schema, not a failed generation. JSON is generated compact (no free
whitespace between tokens): a model, above all a small one, can otherwise pad with blank lines
until max_tokens runs out.
"""

from __future__ import annotations

import json
from typing import Any

from llguidance import LLMatcher

from ..errors import InvalidRequestError
from ..protocols.openai.types import ResponseFormat

COMPACT = {"whitespace_flexible": False}
SCHEMA_PARAM = "response_format.json_schema.schema"


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """A Lark grammar whose only sentences are compact JSON values valid against `schema`.

    Raises InvalidRequestError (param response_format.json_schema.schema) when llguidance cannot
    compile the schema.
    """
    guided = _compact(schema)
    check_json_schema(guided)
    return "start: %json " + json.dumps(guided, ensure_ascii=False)


def json_object_grammar() -> str:
    """Any JSON object (OpenAI's json_object mode)."""
    return "start: " + json_schema_rule({"type": "object"})


def json_schema_rule(schema: dict[str, Any]) -> str:
    """The `%json {...}` item that embeds `schema` in a larger Lark grammar (no validation)."""
    return "%json " + json.dumps(_compact(schema), ensure_ascii=False)


def check_json_schema(schema: dict[str, Any], param: str = SCHEMA_PARAM) -> None:
    """400 naming `param` unless llguidance can compile `schema`."""
    try:
        grammar = LLMatcher.grammar_from_json_schema(schema)
    except ValueError as exc:
        raise InvalidRequestError(f"Invalid JSON schema: {exc}", param=param) from None
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidRequestError(
            f"Unsupported or invalid JSON schema: {_first_line(error)}", param=param
        )


def response_format_grammar(response_format: ResponseFormat | None) -> str | None:
    """The grammar a response_format asks for; None for plain text."""
    rule = response_format_rule(response_format)
    return None if rule is None else "start: " + rule


def response_format_rule(response_format: ResponseFormat | None) -> str | None:
    """The Lark expression of a response_format's answer (its schema checked); None for text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return json_schema_rule({"type": "object"})
    spec = response_format.json_schema
    if spec is None:
        raise InvalidRequestError(
            "response_format of type json_schema needs a json_schema object",
            param="response_format.json_schema",
        )
    if spec.schema_ is None:  # OpenAI: no schema means any JSON object
        return json_schema_rule({"type": "object"})
    check_json_schema(_compact(spec.schema_))
    return json_schema_rule(spec.schema_)


def _compact(schema: dict[str, Any]) -> dict[str, Any]:
    own = schema.get("x-guidance")
    return {**schema, "x-guidance": {**COMPACT, **(own if isinstance(own, dict) else {})}}


def _first_line(error: str) -> str:
    line = error.strip().splitlines()[0] if error.strip() else error
    return line.removeprefix("failed to compile JSON schema: ")
