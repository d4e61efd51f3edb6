"""response_format over real HTTP: constrained decoding makes random weights emit valid JSON."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import httpx2 as httpx
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel, ConfigDict, Field
from starlette.testclient import TestClient

from mlx_engine_server.chat.structured import json_object_grammar, json_schema_grammar
from mlx_engine_server.errors import InvalidRequestError

from ..conftest import LiveServer
from ..protocols.test_api import HELLO, error_of, sse_payloads


class Pet(BaseModel):
    """Every string bounded, no extra keys: a random model never closes an unbounded string."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["cat", "dog", "owl"]
    age: int = Field(ge=0, le=30)
    indoor: bool
    name: str = Field(max_length=6)


def pet_format() -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": {"name": "pet", "schema": Pet.model_json_schema(), "strict": True},
    }


def chat_json(client: TestClient, **fields: Any) -> dict[str, Any]:
    body = {"messages": HELLO, "max_tokens": 60, "response_format": pet_format(), **fields}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


@pytest.mark.parametrize("fields", [{"temperature": 0}, {"temperature": 1.0, "seed": 3}])
def test_json_schema_output_validates_even_from_random_weights(
    client: TestClient, fields: dict[str, Any]
) -> None:
    completion = ChatCompletion.model_validate(chat_json(client, **fields))
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    Pet.model_validate_json(choice.message.content or "")


def test_without_the_constraint_the_same_request_is_not_json(client: TestClient) -> None:
    """The proof that the test above tests something: the random model alone emits no JSON."""
    text = client.post(
        "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 30, "temperature": 0}
    ).json()["choices"][0]["message"]["content"]
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_json_schema_streamed_concatenates_to_valid_json(client: TestClient) -> None:
    body = {
        "messages": HELLO,
        "max_tokens": 60,
        "temperature": 0,
        "stream": True,
        "response_format": pet_format(),
    }
    payloads = sse_payloads(client, "/v1/chat/completions", body)
    chunks = [ChatCompletionChunk.model_validate(json.loads(p)) for p in payloads[:-1]]
    assert chunks[-1].choices[0].finish_reason == "stop"
    Pet.model_validate_json("".join(c.choices[0].delta.content or "" for c in chunks))


def test_json_object_mode_allows_only_an_object(client: TestClient) -> None:
    """A bias towards `}` gives `}}}}` unconstrained; json_object turns it into `{}`."""
    close = client.post("/tokenize", json={"prompt": "}", "add_special_tokens": False}).json()
    bias = {str(close["tokens"][0]): 100}
    body = {"messages": HELLO, "max_tokens": 8, "temperature": 0, "logit_bias": bias}
    free = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert free["message"]["content"].startswith("}}")
    fmt = {"type": "json_object"}
    constrained = client.post("/v1/chat/completions", json={**body, "response_format": fmt})
    choice = constrained.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert json.loads(choice["message"]["content"]) == {}


def test_constrained_row_ends_with_its_grammar_even_with_ignore_eos(client: TestClient) -> None:
    result = chat_json(client, temperature=0, ignore_eos=True, max_tokens=80)
    assert result["choices"][0]["finish_reason"] == "stop"
    Pet.model_validate_json(result["choices"][0]["message"]["content"])


def test_text_completions_accept_response_format(client: TestClient) -> None:
    body = {"prompt": "A pet:", "max_tokens": 60, "response_format": pet_format()}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    Pet.model_validate_json(choice["text"])


def test_text_response_format_is_plain_generation(client: TestClient) -> None:
    plain = client.post(
        "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 6, "temperature": 0}
    ).json()
    text = chat_json(client, temperature=0, max_tokens=6, response_format={"type": "text"})
    assert text["choices"][0]["message"] == plain["choices"][0]["message"]


BAD_FORMATS = [
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "xml"}, "response_format.type"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "response_format.json_schema.name"),
    (
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}},
        "response_format.json_schema.schema",
    ),
    (
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/no"}}},
        "response_format.json_schema.schema",
    ),
    (
        {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}},
        },
        "response_format.json_schema.schema",
    ),
    (
        {"type": "json_schema", "json_schema": {"name": "x", "schema": "object"}},
        "response_format.json_schema.schema",
    ),
]


@pytest.mark.parametrize(("fmt", "param"), BAD_FORMATS)
def test_bad_response_formats_are_400_naming_the_part(
    client: TestClient, fmt: dict[str, Any], param: str
) -> None:
    body = {"messages": HELLO, "max_tokens": 4, "response_format": fmt}
    error = error_of(client.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_grammar_helpers_are_lark_with_embedded_json() -> None:
    grammar = json_schema_grammar({"type": "object", "properties": {"a": {"type": "integer"}}})
    assert grammar.startswith("start: %json {")
    assert json_object_grammar().startswith("start: %json {")
    with pytest.raises(InvalidRequestError) as caught:
        json_schema_grammar({"type": "nonsense"})
    assert caught.value.param == "response_format.json_schema.schema"


def post_chat(base_url: str, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_constrained_and_free_rows_share_a_batch(tiny_server: LiveServer) -> None:
    free = {"messages": HELLO, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    alone = post_chat(tiny_server.base_url, free)["choices"][0]["message"]["content"]
    constrained = {**free, "max_tokens": 60, "response_format": pet_format()}
    bodies = [free, constrained, free, constrained]
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        results = list(pool.map(lambda body: post_chat(tiny_server.base_url, body), bodies))
    for body, result in zip(bodies, results, strict=True):
        content = result["choices"][0]["message"]["content"]
        if "response_format" in body:
            Pet.model_validate_json(content)
        else:
            assert content == alone


def test_openai_sdk_parse_with_a_pydantic_model(tiny_server: LiveServer) -> None:
    client = OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="unused", max_retries=0)
    completion = client.chat.completions.parse(
        model="tiny",
        messages=[{"role": "user", "content": "Describe a pet."}],
        response_format=Pet,
        max_tokens=60,
        temperature=0,
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Pet)
    assert completion.choices[0].finish_reason == "stop"
