"""Structured output: `response_format` as a llguidance grammar (Lark syntax) the engine enforces.

Schemas are checked here, before the request is queued, so an unsupported keyword, a broken
`$ref` or a schema no finite value matches is a 400 naming the schema, not a failed generation.
JSON is generated compact (no free whitespace between tokens): a model, above all a small one,
can otherwise pad with blank lines until max_tokens runs out.
"""

from __future__ import annotations

import json
from typing import Any

from llguidance import LLMatcher

from ..errors import InvalidRequestError
from ..protocols.openai.types import ResponseFormat
from .schema_depth import reference_depth
from .schema_finite import has_finite_instance

COMPACT = {"whitespace_flexible": False}
SCHEMA_PARAM = "response_format.json_schema.schema"
# Objects and arrays nested along $ref chains; llguidance crashed near 2,800 (8 MiB stack).
MAX_SCHEMA_DEPTH = 512


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
    """400 naming `param` unless llguidance can compile `schema` and it has a finite value."""
    check_schema_depth(schema, param)  # first: llguidance itself crashes on a too deep one
    try:
        grammar = LLMatcher.grammar_from_json_schema(schema)
    except ValueError as exc:
        raise InvalidRequestError(f"Invalid JSON schema: {exc}", param=param) from None
    error = LLMatcher.validate_grammar(grammar)
    if error:
        raise InvalidRequestError(
            f"Unsupported or invalid JSON schema: {_first_line(error)}", param=param
        )
    check_schema_has_finite_instance(schema, param)


def check_schema_depth(schema: Any, param: str = SCHEMA_PARAM) -> None:
    """400 naming `param` when `schema`, its `$ref`s followed, nests deeper than llguidance's
    compiler can recurse safely (it overflowed its stack near 2,800 levels, ending the server)."""
    depth = reference_depth(schema)
    if depth > MAX_SCHEMA_DEPTH:
        raise InvalidRequestError(
            f"JSON schema too deeply nested: its $ref chains reach {depth} levels, "
            f"at most {MAX_SCHEMA_DEPTH} are allowed.",
            param=param,
        )


def check_schema_has_finite_instance(schema: Any, param: str = SCHEMA_PARAM) -> None:
    """400 naming `param` when no finite JSON value matches `schema` (a `$ref` loop with no way
    out, an object that requires itself): its grammar has no sentence to generate."""
    if not has_finite_instance(schema):
        raise InvalidRequestError(
            "Unsatisfiable JSON schema: no finite JSON value matches it (a required property, "
            "item or $ref leads back to itself with no way out).",
            param=param,
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
