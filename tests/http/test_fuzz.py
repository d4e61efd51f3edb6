"""Fuzzing: /openapi.json against the routes, schemathesis against a live server, and hypothesis
properties of the request models and of the streaming detokenizer."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.routing import Route
from starlette.testclient import TestClient

from mlx_engine_server.engine.stop_text import StopTextFilter
from mlx_engine_server.http.app import ServerOptions
from mlx_engine_server.http.body import _validation_error
from mlx_engine_server.protocols.openai.types import ChatCompletionRequest, CompletionRequest

from ..conftest import LiveServer, run_live_server, start_engine

EXAMPLES_PER_OPERATION = 12
EXAMPLES_PER_GENERATION = 25  # POST routes: most examples are refused, some generate
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


# --- /openapi.json --------------------------------------------------------------------------


def app_operations(client: TestClient) -> set[tuple[str, str]]:
    operations = set()
    for route in client.app.routes:  # type: ignore[attr-defined]
        assert isinstance(route, Route)
        path = re.sub(r"\{(\w+)(:\w+)?\}", r"{\1}", route.path)
        operations.update((method, path) for method in route.methods or () if method != "HEAD")
    return operations


def test_openapi_describes_every_route_and_nothing_else(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    described = {
        (method.upper(), path) for path, item in document["paths"].items() for method in item
    }
    assert described == app_operations(client)
    schemas = document["components"]["schemas"]
    for path, item in document["paths"].items():
        for operation in item.values():
            assert "200" in operation["responses"], path
            body = operation.get("requestBody")
            if body is not None:
                ref = body["content"]["application/json"]["schema"]["$ref"]
                assert ref.rsplit("/", 1)[1] in schemas
    assert "messages" in schemas["ChatCompletionRequest"]["required"]


# --- schemathesis against a live server -----------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir: Path) -> Iterator[LiveServer]:
    """The tiny model (context 256 tokens): every generation the fuzzer asks for stays short."""
    live = run_live_server(start_engine(tiny_model_dir), ServerOptions())
    yield live
    live.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_server: LiveServer) -> Any:
    return schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json")


OPERATIONS = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/responses"),
    ("POST", "/v1/messages"),
    ("POST", "/v1/messages/count_tokens"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
    ("GET", "/v1/mlx/status"),
    ("GET", "/health"),
    ("GET", "/openapi.json"),
    ("GET", "/v1/responses/{response_id}"),
    ("DELETE", "/v1/responses/{response_id}"),
    ("GET", "/v1/responses/{response_id}/input_items"),
    ("POST", "/v1/conversations"),
    ("GET", "/v1/conversations/{conversation_id}"),
    ("POST", "/v1/conversations/{conversation_id}"),
    ("DELETE", "/v1/conversations/{conversation_id}"),
    ("GET", "/v1/conversations/{conversation_id}/items"),
    ("POST", "/v1/conversations/{conversation_id}/items"),
    ("GET", "/v1/conversations/{conversation_id}/items/{item_id}"),
    ("DELETE", "/v1/conversations/{conversation_id}/items/{item_id}"),
    ("GET", "/v1/sessions/{session_id}"),
    ("DELETE", "/v1/sessions/{session_id}"),
]


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_schemathesis_finds_no_5xx_and_no_schema_violation(
    api_schema: Any, fuzz_server: LiveServer, method: str, path: str
) -> None:
    operation = api_schema[path][method]

    @settings(
        max_examples=EXAMPLES_PER_GENERATION if method == "POST" else EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy())
    def run(case: Any) -> None:
        case.call_and_validate(base_url=fuzz_server.base_url, checks=CHECKS, timeout=60)

    run()


def test_every_operation_is_fuzzed(client: TestClient) -> None:
    # Text, HTML, scripts: nothing to validate (tests/http/test_pages.py checks the pages).
    not_json = {("GET", "/metrics"), ("GET", "/"), ("GET", "/docs"), ("GET", "/static/{name}")}
    fuzzed = set(OPERATIONS) | not_json
    assert fuzzed == app_operations(client)


# --- hypothesis: request models ---------------------------------------------------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
FIELD_NAMES = sorted(
    set(ChatCompletionRequest.model_fields)
    | set(CompletionRequest.model_fields)
    | {"role", "content"}
)
BODIES = st.dictionaries(
    st.sampled_from(FIELD_NAMES) | st.text(max_size=6), JSON_VALUES, max_size=8
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant", "tool", "bogus"]),
        "content": JSON_VALUES,
    }
)


# derandomize: the same examples on every run, so CI never fails by chance on a new one.
@settings(max_examples=120, deadline=None, database=None, derandomize=True)
@given(body=BODIES, messages=st.none() | st.lists(MESSAGE, max_size=3))
@pytest.mark.parametrize("model", [ChatCompletionRequest, CompletionRequest])
def test_any_json_body_validates_or_is_a_400_naming_a_known_field(
    model: type[ChatCompletionRequest | CompletionRequest],
    body: dict[str, Any],
    messages: list[dict[str, Any]] | None,
) -> None:
    if messages is not None:
        body = {**body, "messages": messages}
    try:
        model.model_validate(body)
    except ValidationError as exc:
        error = _validation_error(exc, body)
        assert error.status_code == 400
        assert error.message
        if error.param is not None:
            assert re.match(r"^[a-z_]+", error.param).group() in model.model_fields  # type: ignore[union-attr]


# --- hypothesis: the streaming detokenizer ----------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(client: TestClient) -> Any:
    return client.app.state.engine.tokenizer  # type: ignore[attr-defined]


def stream_text(tokenizer: Any, token_ids: list[int]) -> list[str]:
    """The pieces the engine posts, made as worker.py makes them (detokenizer, then stop filter)."""
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    stops = StopTextFilter(())
    pieces = []
    for index, token in enumerate(token_ids):
        detokenizer.add_token(token)
        if index == len(token_ids) - 1:
            detokenizer.finalize()
        text, _ = stops.feed(detokenizer.last_segment)
        pieces.append(text)
    pieces.append(stops.flush())
    return [piece for piece in pieces if piece]


@pytest.fixture(scope="module")
def token_ids(tokenizer: Any) -> st.SearchStrategy[list[int]]:
    """Any token, and often a byte-level one: those split multi-byte characters."""
    vocab = tokenizer.get_vocab()
    # mlx-lm 0.32.2's BPE detokenizer streams the NUL byte's token ("Ā") as "Ā", not "\x00"
    # (`if byte_decoder.get(c, False)` drops byte 0): a known upstream bug, left out here.
    nul = vocab.get("\u0100")
    short = sorted(token_id for piece, token_id in vocab.items() if len(piece) <= 2)
    short = [token_id for token_id in short if token_id != nul]
    any_token = st.integers(min_value=0, max_value=len(tokenizer) - 1).filter(lambda t: t != nul)
    return st.lists(st.sampled_from(short) | any_token, min_size=1, max_size=24)


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_streamed_text_equals_the_full_decode(
    tokenizer: Any, token_ids: st.SearchStrategy[list[int]], data: st.DataObject
) -> None:
    ids = data.draw(token_ids)
    pieces = stream_text(tokenizer, ids)
    full = tokenizer.decode(ids)
    # mlx-lm's BPE detokenizer drops one leading space of a generation's first text.
    assert "".join(pieces) == (full[1:] if full.startswith(" ") else full)
    for piece in pieces:
        piece.encode("utf-8")  # no lone surrogates: valid UTF-8 on the wire
    if "\ufffd" not in full:
        assert not any("\ufffd" in piece for piece in pieces)
