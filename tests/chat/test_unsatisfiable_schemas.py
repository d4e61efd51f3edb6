"""Schemas no finite JSON value matches are refused before admission, on every route that takes
a schema, naming the field as that route spells it; the message never echoes parser internals.

Before, a required self-reference was a 500 after generation had started (with the grammar and
the parser's state in the message), and a pure `$ref` loop a 200 with empty content.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import httpx2 as httpx
import pytest

from mlx_engine_server.chat.schema_depth import reference_depth
from mlx_engine_server.chat.schema_finite import has_finite_instance
from mlx_engine_server.chat.structured import json_schema_rule
from mlx_engine_server.engine import Failed, SamplingParams

from ..conftest import LiveServer

SELF_REQUIRED = {
    "$defs": {
        "n": {"type": "object", "properties": {"a": {"$ref": "#/$defs/n"}}, "required": ["a"]}
    },
    "$ref": "#/$defs/n",
}
MUTUAL = {
    "$defs": {
        "a": {"type": "object", "properties": {"b": {"$ref": "#/$defs/b"}}, "required": ["b"]},
        "b": {"type": "array", "items": {"$ref": "#/$defs/a"}, "minItems": 1},
    },
    "$ref": "#/$defs/a",
}


def ref_chain(links: int) -> dict[str, Any]:
    """`links` definitions, each an object whose property refers to the next; the last is null."""
    defs: dict[str, Any] = {
        f"a{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/a{i + 1}"}}}
        for i in range(links)
    }
    defs[f"a{links}"] = {"type": "null"}
    return {"$defs": defs, "$ref": "#/$defs/a0"}


NO_FINITE_VALUE = {
    "pure $ref loop": {"$defs": {"n": {"$ref": "#/$defs/n"}}, "$ref": "#/$defs/n"},
    "required self-reference": SELF_REQUIRED,
    "required root reference": {
        "type": "object",
        "properties": {"a": {"$ref": "#"}},
        "required": ["a"],
    },
    "mutual recursion through an array": MUTUAL,
    "the only satisfiable branch loops": {
        "$defs": SELF_REQUIRED["$defs"],
        "anyOf": [{"$ref": "#/$defs/n"}, {"type": "integer", "minimum": 5, "maximum": 1}],
    },
    "unresolvable $ref": {"$ref": "#/$defs/missing"},
    "false": False,
    "not anything": {"not": {}},
    "empty enum": {"enum": []},
    "enum of the wrong type": {"type": "integer", "enum": ["a"]},
    "minimum above maximum": {"type": "integer", "minimum": 5, "maximum": 1},
    "minLength above maxLength": {"type": "string", "minLength": 3, "maxLength": 1},
    "required property false": {"type": "object", "properties": {"a": False}, "required": ["a"]},
    "required property forbidden": {
        "type": "object",
        "required": ["a"],
        "additionalProperties": False,
    },
    "more required than maxProperties": {
        "type": "object",
        "required": ["a", "b"],
        "maxProperties": 1,
    },
    "minItems above maxItems": {"type": "array", "minItems": 2, "maxItems": 1},
    # Not unsatisfiable but too deep to compile: 1,000 links crashed the whole server (SIGSEGV
    # in llguidance's compiler); the check measures the depth along $ref chains first.
    "a $ref chain of 1,000 links": ref_chain(1000),
}
# Recursive schemas with a way out: they must stay accepted.
FINITE_RECURSION = {
    "tree": {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                "required": ["kids"],
                "additionalProperties": False,
            }
        },
        "$ref": "#/$defs/node",
    },
    "list ending in null": {
        "type": "object",
        "properties": {"next": {"anyOf": [{"type": "null"}, {"$ref": "#"}]}},
        "required": ["next"],
        "additionalProperties": False,
    },
}
INTERNALS = ("parser error", "<state>", "%json", "Tokens:", "grm_prefix", "Too many items")


def chat(schema: Any, stream: bool) -> tuple[str, dict[str, Any], str]:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    body = {"messages": [{"role": "user", "content": "Hi"}], "response_format": fmt}
    return "/v1/chat/completions", body | {"stream": stream}, "response_format.json_schema.schema"


def completion(schema: Any, stream: bool) -> tuple[str, dict[str, Any], str]:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    body = {"prompt": "Hi", "response_format": fmt, "stream": stream}
    return "/v1/completions", body, "response_format.json_schema.schema"


def chat_forced_tool(schema: Any, stream: bool) -> tuple[str, dict[str, Any], str]:
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "tools": [{"type": "function", "function": {"name": "g"}}, tool],
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "stream": stream,
    }
    return "/v1/chat/completions", body, "tools[1].function.parameters"


def responses_format(schema: Any, stream: bool) -> tuple[str, dict[str, Any], str]:
    fmt = {"type": "json_schema", "name": "x", "schema": schema}
    body = {"input": "Hi", "text": {"format": fmt}, "stream": stream}
    return "/v1/responses", body, "text.format.schema"


def responses_forced_tool(schema: Any, stream: bool) -> tuple[str, dict[str, Any], str]:
    tool = {"type": "function", "name": "f", "parameters": schema}
    body = {"input": "Hi", "tools": [tool], "tool_choice": "required", "stream": stream}
    return "/v1/responses", body, "tools[0].parameters"


def anthropic_forced_tool(schema: Any, stream: bool) -> tuple[str, dict[str, Any], str]:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "Hi"}],
        "tools": [{"name": "f", "input_schema": schema}],
        "tool_choice": {"type": "any"},
        "stream": stream,
    }
    return "/v1/messages", body, "tools[0].input_schema"


def anthropic_format(schema: Any, stream: bool) -> tuple[str, dict[str, Any], str]:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "Hi"}],
        "output_config": {"format": {"type": "json_schema", "schema": schema}},
        "stream": stream,
    }
    return "/v1/messages", body, "output_config.format.schema"


Route = Callable[[Any, bool], tuple[str, dict[str, Any], str]]
ROUTES: dict[str, Route] = {
    "chat": chat,
    "completions": completion,
    "chat forced tool": chat_forced_tool,
    "responses text.format": responses_format,
    "responses forced tool": responses_forced_tool,
    "anthropic forced tool": anthropic_forced_tool,
    "anthropic output_config.format": anthropic_format,
}


def refusal(server: LiveServer, route: Route, schema: Any, stream: bool) -> str:
    """The refusal's message, after checking that it names the route's own parameter."""
    path, body, param = route(schema, stream)
    response = httpx.post(f"{server.base_url}{path}", json=body | {"max_tokens": 4}, timeout=60)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    message: str = error["message"]
    if path == "/v1/messages":  # Anthropic's errors name the parameter in the message
        assert message.startswith(f"{param}: ") or message.endswith(f"'{param}'"), message
    else:
        assert error["param"] == param
    return message


@pytest.mark.parametrize("name", list(NO_FINITE_VALUE))
@pytest.mark.parametrize("route", list(ROUTES))
def test_a_schema_without_a_finite_value_is_a_400_naming_it(
    random_hermes_agent_server: LiveServer, route: str, name: str
) -> None:
    stream = list(NO_FINITE_VALUE).index(name) % 2 == 0  # streamed too: a 400 before any byte
    message = refusal(random_hermes_agent_server, ROUTES[route], NO_FINITE_VALUE[name], stream)
    assert not any(internal in message for internal in INTERNALS), message


@pytest.mark.parametrize("name", list(FINITE_RECURSION))
@pytest.mark.parametrize("route", ["chat", "chat forced tool"])
def test_a_recursive_schema_with_a_way_out_is_accepted(
    random_hermes_agent_server: LiveServer, route: str, name: str
) -> None:
    path, body, _ = ROUTES[route](FINITE_RECURSION[name], False)
    body |= {"max_tokens": 60, "temperature": 0}
    response = httpx.post(f"{random_hermes_agent_server.base_url}{path}", json=body, timeout=120)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    if route == "chat" and choice["finish_reason"] == "stop":
        json.loads(choice["message"]["content"])


def test_the_depth_along_references() -> None:
    """Each link's own nesting counts; so does every member of a cycle of references."""
    assert reference_depth({"type": "string"}) == 1
    assert reference_depth(ref_chain(10)) == reference_depth(ref_chain(9)) + 3
    ring = {f"a{i}": {"properties": {"x": {"$ref": f"#/$defs/a{(i + 1) % 50}"}}} for i in range(50)}
    assert reference_depth({"$defs": ring, "$ref": "#/$defs/a0"}) >= 50 * 3


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_a_long_ref_chain_within_the_depth_limit_compiles_and_runs(
    random_hermes_agent_server: LiveServer, route: str
) -> None:
    """150 links (depth 456 of 512) pass the check, and the engine compiles and runs them."""
    path, body, _ = ROUTES[route](ref_chain(150), False)
    body |= {"max_tokens": 8, "temperature": 0}
    response = httpx.post(f"{random_hermes_agent_server.base_url}{path}", json=body, timeout=120)
    assert response.status_code == 200, response.text


def test_the_finite_value_check_on_its_own() -> None:
    """The function other checks call: the fixpoint over references, each case both ways."""
    for name, schema in FINITE_RECURSION.items():
        assert has_finite_instance(schema), name
    for name in ("pure $ref loop", "required self-reference", "mutual recursion through an array"):
        assert not has_finite_instance(NO_FINITE_VALUE[name]), name
    # Integers of any size are compared exactly (float() of one would overflow).
    assert not has_finite_instance({"type": "integer", "minimum": 10**400, "maximum": 1})
    assert has_finite_instance({"type": "integer", "minimum": 10**400})
    assert not has_finite_instance({"type": "integer", "exclusiveMinimum": 1.5, "maximum": 1.9})
    assert has_finite_instance({"type": "number", "exclusiveMinimum": 1.5, "maximum": 1.9})
    chain: dict[str, Any] = {
        f"a{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/a{i + 1}"}}}
        for i in range(200)
    }
    for link in chain.values():
        link["required"] = ["x"]
    chain["a200"] = {"$ref": "#/$defs/a0"}  # back to the start: no way out
    assert not has_finite_instance({"$defs": chain, "$ref": "#/$defs/a0"})
    chain["a200"] = {"anyOf": [{"$ref": "#/$defs/a0"}, {"type": "null"}]}
    assert has_finite_instance({"$defs": chain, "$ref": "#/$defs/a0"})


def test_a_grammar_failing_mid_generation_reports_no_parser_internals(
    random_hermes_agent_server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Past the checks (the engine is handed the grammar directly), a random model sampling in a
    required self-reference breaks llguidance's item limit within a few tokens: the request
    fails with a plain message, and the parser's own words go to the server log only."""
    engine = random_hermes_agent_server.engine
    grammar = "start: " + json_schema_rule(SELF_REQUIRED)
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=1, grammar=grammar)

    async def last_event() -> Any:
        events = [event async for _, event in engine.generate([([1, 2, 3], params)]).events()]
        return events[-1]

    with caplog.at_level(logging.WARNING, logger="mlx_engine_server.engine.worker"):
        failed = asyncio.run(last_event())
    assert isinstance(failed, Failed), failed
    assert failed.message == "constrained decoding failed"
    assert "parser error" in caplog.text
