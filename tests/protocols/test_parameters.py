"""Never silently ignore a parameter: every OpenAI request field is honoured or refused with a 400.

The tables below cover every field of the `openai` SDK's create() parameters (a test fails when the
SDK grows one the table lacks). Each entry names the test that proves it:
- HONOURED: the test shows the field's effect;
- NO_OP: accepted without effect, because OpenAI's own semantics make that correct here (an id
  for abuse tracking, a hint for a cache that is automatic, ...): the reason is given;
- REFUSED: a 400 naming the field in `param` (test_refused_fields_are_400_naming_them);
- TOOLS: tool calling and reasoning, done on the issue4-tools branch (behaviour kept as it was).
"""

from __future__ import annotations

import importlib
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from openai import BadRequestError, OpenAI
from openai.types import completion_create_params as text_params
from openai.types.chat import completion_create_params as chat_params
from starlette.testclient import TestClient

from ..conftest import LiveServer, close_after_test
from .test_api import HELLO, error_of

HONOURED = "honoured"
NO_OP = "accepted no-op"
REFUSED = "refused"
TOOLS = "honoured - issue4-tools branch"
REFUSAL_TEST = "test_parameters::test_refused_fields_are_400_naming_them"
NO_OP_TEST = "test_parameters::test_no_op_fields_are_accepted"

CHAT_FIELDS: dict[str, tuple[str, str]] = {
    "messages": (HONOURED, "test_api::test_chat_completion_parses_as_openai_type"),
    "model": (
        HONOURED,
        "test_api::test_greedy_is_deterministic_and_model_accepted_whatever_it_says",
    ),
    "max_tokens": (HONOURED, "test_api::test_chat_completion_parses_as_openai_type"),
    "max_completion_tokens": (HONOURED, "test_parameters::test_max_completion_tokens"),
    "temperature": (HONOURED, "test_api::test_seed_reproduces_sampling"),
    "top_p": (HONOURED, "test_parameters::test_truncation_filters_narrow_sampling"),
    "seed": (HONOURED, "test_api::test_seed_reproduces_sampling"),
    "stop": (HONOURED, "test_api::test_stop_string_cuts_the_text_and_is_not_returned"),
    "stream": (HONOURED, "test_api::test_streamed_chat_equals_non_streamed"),
    "stream_options": (HONOURED, "test_api::test_stream_include_usage_sends_a_last_usage_chunk"),
    "presence_penalty": (HONOURED, "test_parameters::test_penalties_change_the_output"),
    "frequency_penalty": (HONOURED, "test_parameters::test_penalties_change_the_output"),
    "logit_bias": (HONOURED, "test_structured::test_json_object_mode_allows_only_an_object"),
    "logprobs": (
        HONOURED,
        "test_choices_logprobs::test_chat_logprobs_shape_and_greedy_consistency",
    ),
    "top_logprobs": (
        HONOURED,
        "test_choices_logprobs::test_chat_logprobs_shape_and_greedy_consistency",
    ),
    "n": (HONOURED, "test_choices_logprobs::test_n_choices_are_indexed_seeded_and_counted"),
    "response_format": (
        HONOURED,
        "test_structured::test_json_schema_output_validates_even_from_random_weights",
    ),
    # OpenAI: an end-user id for abuse detection; there is no abuse detection to feed here.
    "user": (NO_OP, NO_OP_TEST),
    "safety_identifier": (NO_OP, NO_OP_TEST),
    # Tags for stored completions; nothing is stored (store: true is refused).
    "metadata": (NO_OP, NO_OP_TEST),
    # Cache routing and retention hints: the prefix cache here is automatic and in memory.
    "prompt_cache_key": (NO_OP, NO_OP_TEST),
    "prompt_cache_options": (NO_OP, NO_OP_TEST),
    "prompt_cache_retention": (NO_OP, NO_OP_TEST),
    # Predicted outputs only change latency, never the output (OpenAI's documented semantics).
    "prediction": (NO_OP, NO_OP_TEST),
    # Accepted as "auto"/"default" (the one tier there is) and false/["text"]; else refused.
    "service_tier": (REFUSED, REFUSAL_TEST),
    "store": (REFUSED, REFUSAL_TEST),
    "modalities": (REFUSED, REFUSAL_TEST),
    "audio": (REFUSED, REFUSAL_TEST),
    "web_search_options": (REFUSED, REFUSAL_TEST),
    "verbosity": (REFUSED, REFUSAL_TEST),
    "moderation": (REFUSED, REFUSAL_TEST),
    "functions": (REFUSED, REFUSAL_TEST),
    "function_call": (REFUSED, REFUSAL_TEST),
    "tools": (TOOLS, ""),
    "tool_choice": (TOOLS, ""),
    "parallel_tool_calls": (TOOLS, ""),
    "reasoning_effort": (TOOLS, ""),
}

TEXT_FIELDS: dict[str, tuple[str, str]] = {
    "prompt": (
        HONOURED,
        "test_choices_logprobs::test_completion_prompts_as_lists_each_with_n_choices",
    ),
    "model": (
        HONOURED,
        "test_api::test_greedy_is_deterministic_and_model_accepted_whatever_it_says",
    ),
    "max_tokens": (HONOURED, "test_api::test_text_completion_and_its_stream"),
    "temperature": (HONOURED, "test_engine::test_seeded_sampling_is_the_same_alone_and_batched"),
    "top_p": (HONOURED, "test_parameters::test_truncation_filters_narrow_sampling"),
    "seed": (HONOURED, "test_engine::test_seeded_sampling_is_the_same_alone_and_batched"),
    "stop": (HONOURED, "test_parameters::test_completion_stop"),
    "stream": (HONOURED, "test_api::test_text_completion_and_its_stream"),
    "stream_options": (HONOURED, "test_parameters::test_completion_stream_usage"),
    "presence_penalty": (HONOURED, "test_parameters::test_penalties_change_the_output"),
    "frequency_penalty": (HONOURED, "test_parameters::test_penalties_change_the_output"),
    "logit_bias": (HONOURED, "test_api::test_logit_bias_forces_a_token"),
    "logprobs": (HONOURED, "test_choices_logprobs::test_completion_logprobs_in_the_legacy_shape"),
    "echo": (HONOURED, "test_choices_logprobs::test_echo_repeats_the_prompt"),
    "n": (
        HONOURED,
        "test_choices_logprobs::test_completion_prompts_as_lists_each_with_n_choices",
    ),
    # best_of == n is the same request; best_of > n (ranking by likelihood) is refused.
    "best_of": (REFUSED, "test_choices_logprobs::test_bad_choice_and_logprob_requests_are_400"),
    "suffix": (REFUSED, REFUSAL_TEST),
    "user": (NO_OP, NO_OP_TEST),
}

REFUSED_VALUES: list[tuple[str, str, Any]] = [
    ("/v1/chat/completions", "service_tier", "priority"),
    ("/v1/chat/completions", "store", True),
    ("/v1/chat/completions", "modalities", ["text", "audio"]),
    ("/v1/chat/completions", "audio", {"voice": "alloy", "format": "mp3"}),
    ("/v1/chat/completions", "web_search_options", {}),
    ("/v1/chat/completions", "verbosity", "low"),
    ("/v1/chat/completions", "moderation", {"model": "omni-moderation-latest"}),
    ("/v1/chat/completions", "functions", [{"name": "f", "parameters": {}}]),
    ("/v1/chat/completions", "function_call", "auto"),
    ("/v1/completions", "suffix", "the end"),
]

NO_OP_VALUES: list[tuple[str, str, Any]] = [
    ("/v1/chat/completions", "user", "user-1234"),
    ("/v1/chat/completions", "safety_identifier", "hashed-id"),
    ("/v1/chat/completions", "metadata", {"purpose": "test"}),
    ("/v1/chat/completions", "prompt_cache_key", "conversation-7"),
    ("/v1/chat/completions", "prompt_cache_options", {"ttl": "30m"}),
    ("/v1/chat/completions", "prompt_cache_retention", "24h"),
    ("/v1/chat/completions", "prediction", {"type": "content", "content": "Hello"}),
    ("/v1/chat/completions", "service_tier", "auto"),
    ("/v1/chat/completions", "store", False),
    ("/v1/chat/completions", "modalities", ["text"]),
    ("/v1/completions", "user", "user-1234"),
    ("/v1/completions", "best_of", 1),
]


def sdk_fields(params_module: Any) -> set[str]:
    return set(params_module.CompletionCreateParamsBase.__annotations__) | {"stream"}


@pytest.mark.parametrize(
    ("table", "params_module"), [(CHAT_FIELDS, chat_params), (TEXT_FIELDS, text_params)]
)
def test_every_sdk_field_is_in_the_table(table: dict[str, Any], params_module: Any) -> None:
    assert set(table) == sdk_fields(params_module)


def module_path_of(name: str) -> str:
    """`test_api` -> `tests.protocols.test_api`: test files live in a folder per part."""
    tests = Path(__file__).resolve().parents[1]
    (path,) = tests.rglob(f"{name}.py")
    return ".".join(("tests", *path.relative_to(tests).with_suffix("").parts))


def test_every_named_test_exists() -> None:
    for table in (CHAT_FIELDS, TEXT_FIELDS):
        for field, (verdict, test) in table.items():
            if verdict == TOOLS:
                continue
            module_name, name = test.split("::")
            module = importlib.import_module(module_path_of(module_name))
            assert callable(getattr(module, name, None)), f"{field}: no test {test}"


def body_for(path: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"max_tokens": 2, "temperature": 0}
    base["messages" if path.endswith("chat/completions") else "prompt"] = (
        HELLO if path.endswith("chat/completions") else "Hello"
    )
    return {**base, **fields}


@pytest.mark.parametrize(("path", "field", "value"), REFUSED_VALUES)
def test_refused_fields_are_400_naming_them(
    client: TestClient, path: str, field: str, value: Any
) -> None:
    error = error_of(client.post(path, json=body_for(path, **{field: value})), 400)
    assert error["param"] == field
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(("path", "field", "value"), NO_OP_VALUES)
def test_no_op_fields_are_accepted(client: TestClient, path: str, field: str, value: Any) -> None:
    plain = client.post(path, json=body_for(path)).json()["choices"]
    with_field = client.post(path, json=body_for(path, **{field: value}))
    assert with_field.status_code == 200, with_field.text
    assert with_field.json()["choices"] == plain


# Required, or the request's own greedy length and sampling (null: the rest of the context and
# a temperature of 1, answers not comparable to the greedy two tokens).
NOT_NULLED = {"messages", "prompt", "max_tokens", "temperature"}
NULLED_FIELDS = [
    (path, field)
    for path, params_module in (
        ("/v1/chat/completions", chat_params),
        ("/v1/completions", text_params),
    )
    for field in sorted(sdk_fields(params_module) - NOT_NULLED)
]


@pytest.mark.parametrize(("path", "field"), NULLED_FIELDS)
def test_null_is_the_default_for_every_field(client: TestClient, path: str, field: str) -> None:
    """OpenAI types every optional field `... or null` (`n`, `stream`, `echo` too): clients that
    send unset fields as null, rather than leaving them out as the SDK does, get the default."""
    plain = client.post(path, json=body_for(path)).json()["choices"]
    nulled = client.post(path, json=body_for(path, **{field: None}))
    assert nulled.status_code == 200, nulled.text
    assert nulled.json()["choices"] == plain


def completion(client: TestClient, **fields: Any) -> dict[str, Any]:
    response = client.post("/v1/completions", json=body_for("/v1/completions", **fields))
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_max_completion_tokens(client: TestClient) -> None:
    body = body_for("/v1/chat/completions", max_completion_tokens=3, ignore_eos=True)
    body.pop("max_tokens")
    assert client.post("/v1/chat/completions", json=body).json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("field", ["presence_penalty", "frequency_penalty"])
def test_penalties_change_the_output(client: TestClient, field: str) -> None:
    """A bias makes one token win every step; a penalty on repeats lets others through."""
    fields = {"max_tokens": 8, "logit_bias": {"1000": 3}, "ignore_eos": True}
    repeated = completion(client, **fields)["choices"][0]["text"]
    penalised = completion(client, **fields, **{field: 2.0})["choices"][0]["text"]
    assert penalised != repeated


@pytest.mark.parametrize("narrow", [{"top_p": 1e-6}, {"top_k": 1}, {"min_p": 1.0}])
def test_truncation_filters_narrow_sampling(client: TestClient, narrow: dict[str, Any]) -> None:
    """Keeping only the most likely token makes any seed's sample the greedy answer."""
    greedy = completion(client, max_tokens=8)["choices"][0]["text"]
    sampled = {
        completion(client, max_tokens=8, temperature=1.0, seed=seed)["choices"][0]["text"]
        for seed in (1, 2)
    }
    assert sampled != {greedy}, "unfiltered sampling should differ from greedy"
    for seed in (1, 2):
        narrowed = completion(client, max_tokens=8, temperature=1.0, seed=seed, **narrow)
        assert narrowed["choices"][0]["text"] == greedy


def test_completion_stop(client: TestClient) -> None:
    text = completion(client, max_tokens=12)["choices"][0]["text"]
    stop = text[4:7]
    assert stop.strip()
    stopped = completion(client, max_tokens=12, stop=stop)["choices"][0]
    assert stopped["finish_reason"] == "stop"
    assert stopped["text"] == text[: text.index(stop)]


def test_completion_stream_usage(client: TestClient) -> None:
    body = body_for("/v1/completions", stream=True, stream_options={"include_usage": True})
    with client.stream("POST", "/v1/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert '"completion_tokens":2' in lines[-2]


@pytest.mark.parametrize("path", ["chat", "text"])
def test_stream_options_without_stream_is_refused(tiny_server: LiveServer, path: str) -> None:
    """As on OpenAI: stream_options only with stream: true (null is the default, see above)."""
    sdk = close_after_test(
        OpenAI(base_url=f"{tiny_server.base_url}/v1", api_key="x", max_retries=0)
    )
    usage = {"include_usage": True}
    create: Any = (
        partial(sdk.chat.completions.create, messages=HELLO)
        if path == "chat"
        else partial(sdk.completions.create, prompt="Hello")
    )
    with pytest.raises(BadRequestError) as refused:
        create(model="m", max_tokens=2, stream_options=usage)
    assert refused.value.param == "stream_options"
    assert "only allowed when 'stream' is enabled" in refused.value.message
    assert refused.value.type == "invalid_request_error"
