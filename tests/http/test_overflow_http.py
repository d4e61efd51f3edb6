"""Long conversations over real HTTP: each context-overflow policy with the tiny model (window 256).

Expected prompts are rendered here with the model's own template and tokenizer, so `usage`
proves which messages the model saw.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.testclient import TestClient

from mlx_engine_server.chat.overflow import SUMMARY_INSTRUCTION, SUMMARY_LABEL
from mlx_engine_server.http.app import ServerOptions, create_app

from ..conftest import TINY_CONTEXT_WINDOW, start_engine
from ..model_factory import (
    build_tiny_llama,
    scripted_model,
    use_chat_template,
    with_thinking_tokens,
)
from ..protocols.test_api import error_of

Messages = list[dict[str, Any]]
SYSTEM = {"role": "system", "content": "You answer briefly."}
SUMMARY_MAX_TOKENS = 12
MAX_TOKENS = 4
BUDGET = TINY_CONTEXT_WINDOW - MAX_TOKENS
ANSWER_TOKENS = 40
LONG_ANSWER = {"max_tokens": ANSWER_TOKENS, "ignore_eos": True}
SUM = "summarize"


@pytest.fixture(scope="module")
def overflow_client(tiny_app: Starlette) -> TestClient:
    """A second app on the session's engine: truncate by default, any policy per request.

    Not entered as a context manager: the engine belongs to `tiny_app`, whose lifespan stops it.
    """
    options = ServerOptions(
        context_overflow="truncate",
        allow_request_overflow_policy=True,
        summary_keep_messages=2,
        summary_max_tokens=SUMMARY_MAX_TOKENS,
    )
    return TestClient(create_app(tiny_app.state.engine, options))


@pytest.fixture(scope="module")
def prompt_length(overflow_client: TestClient) -> Callable[[Messages], int]:
    """The prompt tokens a chat of these messages gets, as the server renders it."""

    def length(messages: Messages) -> int:
        response = overflow_client.post("/tokenize", json={"messages": messages})
        assert response.status_code == 200, response.text
        count: int = response.json()["count"]
        return count

    return length


def conversation(turns: int) -> Messages:
    """A system message, user/assistant turns of about 22 tokens each, a last user message."""
    messages: Messages = [SYSTEM]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question {turn}: " + "apple pie " * 7})
        messages.append({"role": "assistant", "content": f"Answer {turn}: " + "cherry " * 14})
    messages.append({"role": "user", "content": "And now? " + "banana " * 12})
    return messages


def grown_past(messages: Messages, budget: int, length: Callable[[Messages], int]) -> Messages:
    """The conversation with its system message grown word by word until it just overflows."""
    system = dict(messages[0])
    while length([system, *messages[1:]]) <= budget:
        system["content"] += " plum"
    return [system, *messages[1:]]


def post(client: TestClient, messages: Messages, **fields: Any) -> Any:
    body = {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, **fields}
    return client.post("/v1/chat/completions", json=body)


def completion(client: TestClient, messages: Messages, **fields: Any) -> tuple[Any, ChatCompletion]:
    response = post(client, messages, **fields)
    assert response.status_code == 200, response.text
    return response, ChatCompletion.model_validate(response.json())


def stream(client: TestClient, messages: Messages, **fields: Any) -> tuple[Any, list[Any]]:
    body = {
        "messages": messages,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **fields,
    }
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        payloads = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    return response, [json.loads(payload) for payload in payloads[:-1]]


def newest_that_fit(messages: Messages, budget: int, length: Callable[[Messages], int]) -> Messages:
    """The system message and the most newest whole turns within the budget, found by hand."""
    kept = [messages[0], messages[-1]]
    for start in range(len(messages) - 3, 0, -2):  # each earlier turn: a user and an assistant
        candidate = [messages[0], *messages[start:]]
        if length(candidate) > budget:
            break
        kept = candidate
    return kept


# --- truncate ---------------------------------------------------------------------------------


def test_a_conversation_that_fits_is_untouched_by_every_policy(
    overflow_client: TestClient, prompt_length: Callable[[Messages], int]
) -> None:
    messages = conversation(2)
    for policy in ("truncate", "summarize", "error"):
        response, body = completion(overflow_client, messages, context_overflow=policy)
        assert "x-context-compacted" not in response.headers
        assert body.usage is not None
        assert body.usage.prompt_tokens == prompt_length(messages)
        assert "summary_usage" not in response.json()["usage"]


def test_truncate_overflowing_by_one_message_drops_the_oldest_turn(
    overflow_client: TestClient, prompt_length: Callable[[Messages], int]
) -> None:
    messages = grown_past(conversation(4), BUDGET, prompt_length)
    assert prompt_length(messages) - BUDGET <= 2  # less than any one message
    response, body = completion(overflow_client, messages)
    assert response.headers["x-context-compacted"] == "truncate; dropped=2"
    assert body.usage is not None
    assert body.usage.prompt_tokens == prompt_length([messages[0], *messages[3:]])


def test_truncate_overflowing_by_far_keeps_the_newest_turns_that_fit(
    overflow_client: TestClient, prompt_length: Callable[[Messages], int]
) -> None:
    messages = conversation(40)  # about 1,800 tokens
    expected = newest_that_fit(messages, BUDGET, prompt_length)
    header = f"truncate; dropped={len(messages) - len(expected)}"
    response, body = completion(overflow_client, messages)
    assert response.headers["x-context-compacted"] == header
    assert body.usage is not None
    assert body.usage.prompt_tokens == prompt_length(expected)
    streamed, chunks = stream(overflow_client, messages)
    assert streamed.headers["x-context-compacted"] == header
    streamed_usage = ChatCompletionChunk.model_validate(chunks[-1]).usage
    assert streamed_usage is not None
    assert streamed_usage.prompt_tokens == body.usage.prompt_tokens


def test_truncate_keeps_a_tool_call_with_its_results(
    overflow_client: TestClient, prompt_length: Callable[[Messages], int]
) -> None:
    def call(*ids: str) -> dict[str, Any]:
        calls = [
            {"id": i, "type": "function", "function": {"name": "weather", "arguments": "{}"}}
            for i in ids
        ]
        return {"role": "assistant", "content": "Calling. " + "cloud " * 20, "tool_calls": calls}

    def result(call_id: str) -> dict[str, Any]:
        return {"role": "tool", "tool_call_id": call_id, "content": "Rain. " + "drop " * 25}

    messages = [SYSTEM, {"role": "user", "content": "Weather?"}, call("a", "b"), result("a")]
    messages += [result("b"), call("c"), result("c"), call("d"), result("d")]
    # Room for all but the oldest call and both its results: a call and its results go together
    # (keeping the second result alone would leave it answering nothing).
    max_tokens = TINY_CONTEXT_WINDOW - prompt_length([*messages[:2], *messages[5:]])
    response, body = completion(overflow_client, messages, max_tokens=max_tokens)
    assert response.headers["x-context-compacted"] == "truncate; dropped=3"
    assert body.usage is not None
    assert body.usage.prompt_tokens == prompt_length([*messages[:2], *messages[5:]])


def test_truncate_refuses_when_the_last_message_alone_is_too_long(
    overflow_client: TestClient, prompt_length: Callable[[Messages], int]
) -> None:
    refusals = status(overflow_client)["refusals"]
    messages = [*conversation(1)[:-1], {"role": "user", "content": "fig " * 300}]
    shortest = prompt_length([messages[0], messages[-1]])
    error = error_of(post(overflow_client, messages), 400)
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "max_tokens"
    assert f"maximum context length is {TINY_CONTEXT_WINDOW} tokens" in error["message"]
    assert f"{shortest} in the prompt even with only the system messages" in error["message"]
    assert f"{MAX_TOKENS} for the completion" in error["message"]
    assert status(overflow_client)["refusals"] == refusals + 1


def test_truncate_makes_room_for_max_tokens_and_refuses_what_cannot_fit(
    overflow_client: TestClient, prompt_length: Callable[[Messages], int]
) -> None:
    messages = conversation(40)
    response, body = completion(overflow_client, messages, max_tokens=150)
    assert response.headers["x-context-compacted"].startswith("truncate; dropped=")
    assert body.usage is not None
    expected = newest_that_fit(messages, TINY_CONTEXT_WINDOW - 150, prompt_length)
    assert body.usage.prompt_tokens == prompt_length(expected)
    too_many = post(overflow_client, messages, max_tokens=TINY_CONTEXT_WINDOW)
    assert error_of(too_many, 400)["code"] == "context_length_exceeded"


def test_without_max_tokens_truncate_keeps_a_quarter_of_the_window_for_the_answer(
    overflow_client: TestClient, prompt_length: Callable[[Messages], int]
) -> None:
    body = {"messages": conversation(40), "temperature": 0, "logit_bias": {"2": 100}}
    response = overflow_client.post("/v1/chat/completions", json=body)  # stops at once: EOS
    assert response.status_code == 200, response.text
    reserve = TINY_CONTEXT_WINDOW // 4
    expected = newest_that_fit(conversation(40), TINY_CONTEXT_WINDOW - reserve, prompt_length)
    assert response.json()["usage"]["prompt_tokens"] == prompt_length(expected)


def test_text_completions_keep_the_error_policy(overflow_client: TestClient) -> None:
    response = overflow_client.post(
        "/v1/completions", json={"prompt": "fig " * 300, "max_tokens": MAX_TOKENS}
    )
    assert error_of(response, 400)["code"] == "context_length_exceeded"


# --- summarize --------------------------------------------------------------------------------


def test_summarize_replaces_old_turns_and_counts_the_summary_in_usage(
    overflow_client: TestClient, prompt_length: Callable[[Messages], int]
) -> None:
    messages = conversation(5)  # about 250 tokens; keeps the last 2 messages as they are
    kept = [messages[0], *messages[-3:]]  # the last user message and the turn before it
    assert prompt_length(messages) > TINY_CONTEXT_WINDOW - ANSWER_TOKENS
    before = status(overflow_client)
    requests_before = engine_requests(overflow_client)
    response, body = completion(overflow_client, messages, **LONG_ANSWER, context_overflow=SUM)
    assert engine_requests(overflow_client) == requests_before + 2  # the summary, the answer
    assert response.headers["x-context-compacted"] == "summarize; summarized=8"
    usage = response.json()["usage"]
    summary = usage["summary_usage"]
    assert 1 <= summary["completion_tokens"] <= SUMMARY_MAX_TOKENS
    assert summary["prompt_tokens"] > prompt_length(messages[1:9]) - prompt_length([SYSTEM])
    model_prompt = usage["prompt_tokens"] - summary["prompt_tokens"]
    assert prompt_length(kept) < model_prompt <= TINY_CONTEXT_WINDOW - ANSWER_TOKENS
    assert usage["completion_tokens"] == summary["completion_tokens"] + ANSWER_TOKENS
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    after = status(overflow_client)
    assert after["summaries"] == before["summaries"] + 1
    assert after["messages_summarized"] == before["messages_summarized"] + 8
    spent = summary["prompt_tokens"] + summary["completion_tokens"]
    assert after["summary_tokens"] == before["summary_tokens"] + spent
    assert body.choices[0].finish_reason in ("length", "stop")


def test_summarize_while_streaming_sends_the_header_and_summary_usage(
    overflow_client: TestClient,
) -> None:
    response, chunks = stream(overflow_client, conversation(5), **LONG_ANSWER, context_overflow=SUM)
    assert response.headers["x-context-compacted"] == "summarize; summarized=8"
    last = ChatCompletionChunk.model_validate(chunks[-1])
    assert last.usage is not None
    summary = chunks[-1]["usage"]["summary_usage"]
    assert last.usage.prompt_tokens > summary["prompt_tokens"] > 0
    assert last.usage.completion_tokens == summary["completion_tokens"] + ANSWER_TOKENS


def test_summarize_overflowing_by_one_message(
    overflow_client: TestClient, prompt_length: Callable[[Messages], int]
) -> None:
    messages = grown_past(conversation(4), BUDGET, prompt_length)
    response, _ = completion(overflow_client, messages, context_overflow="summarize")
    assert response.headers["x-context-compacted"] == "summarize; summarized=6"


def test_summarize_a_history_longer_than_the_window(overflow_client: TestClient) -> None:
    messages = conversation(40)
    response, _ = completion(overflow_client, messages, context_overflow="summarize")
    header = response.headers["x-context-compacted"]
    assert header.startswith("summarize; summarized=78; unread=")
    assert int(header.rsplit("=", 1)[1]) > 60
    summary = response.json()["usage"]["summary_usage"]
    assert summary["prompt_tokens"] <= TINY_CONTEXT_WINDOW - SUMMARY_MAX_TOKENS


@pytest.fixture(scope="module")
def thinking_template_client(
    tmp_path_factory: pytest.TempPathFactory, smollm_dir: Path
) -> Iterator[TestClient]:
    """The tiny model behind a template that opens <think> when enable_thinking is set."""
    dest = tmp_path_factory.mktemp("thinking-overflow") / "tiny-hermes"
    model = build_tiny_llama(dest, smollm_dir, context_window=TINY_CONTEXT_WINDOW)
    engine = start_engine(use_chat_template(model, "hermes_tools.jinja"))
    options = ServerOptions(
        context_overflow="summarize", summary_keep_messages=2, summary_max_tokens=SUMMARY_MAX_TOKENS
    )
    with TestClient(create_app(engine, options)) as client:
        yield client
    engine.stop()


def test_the_summary_prompt_leaves_out_the_requests_template_arguments(
    thinking_template_client: TestClient,
) -> None:
    """enable_thinking opens <think> in the request's own prompt, never in its summary's
    (docs/long-conversations.md: a summary that thinks spends its tokens on reasoning)."""
    messages = conversation(5)
    thinking = {"chat_template_kwargs": {"enable_thinking": True}}
    plain, _ = completion(thinking_template_client, messages)
    thought, _ = completion(thinking_template_client, messages, **thinking)
    for response in (plain, thought):
        assert response.headers["x-context-compacted"].startswith("summarize; summarized=")
    plain_usage, thought_usage = plain.json()["usage"], thought.json()["usage"]
    summary_prompt = plain_usage["summary_usage"]["prompt_tokens"]
    assert thought_usage["summary_usage"]["prompt_tokens"] == summary_prompt
    assert thought_usage["prompt_tokens"] > plain_usage["prompt_tokens"]


REASONED_SUMMARY = "secret plan</think>The summary."  # the scripted model's every answer


@pytest.fixture(scope="module")
def thinking_summarizer(
    tmp_path_factory: pytest.TempPathFactory, smollm_dir: Path
) -> Iterator[TestClient]:
    """A scripted model that answers REASONED_SUMMARY (reasoning, </think>, a summary) behind a
    template that thinks by default (Qwen3's way: <think> tokens in the vocabulary, a prompt that
    opens <think> unless enable_thinking is false)."""
    root = tmp_path_factory.mktemp("thinks-by-default") / "scripted"
    model = scripted_model(root, smollm_dir, REASONED_SUMMARY, "thinks_by_default.jinja")
    with_thinking_tokens(model)
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    config["max_position_embeddings"] = TINY_CONTEXT_WINDOW
    (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    engine = start_engine(model)
    options = ServerOptions(
        context_overflow="summarize", summary_keep_messages=2, summary_max_tokens=SUMMARY_MAX_TOKENS
    )
    with TestClient(create_app(engine, options)) as client:
        yield client
    engine.stop()


def test_a_summary_is_written_without_thinking_and_keeps_no_reasoning(
    thinking_summarizer: TestClient,
) -> None:
    """Before, the summary prompt opened <think> (the template's default) and the summary
    message held the reasoning and </think>. Now the prompt closes the thinking block
    (enable_thinking=False), and what the model still reasons is cut from the summary."""
    client = thinking_summarizer

    def count(messages: Messages, **fields: Any) -> int:
        response = client.post("/tokenize", json={"messages": messages, **fields})
        assert response.status_code == 200, response.text
        tokens: int = response.json()["count"]
        return tokens

    messages = conversation(5)
    response, _ = completion(client, messages)
    assert response.headers["x-context-compacted"] == "summarize; summarized=8"
    summarized = 8
    usage = response.json()["usage"]
    lines = [f"{message['role']}: {message['content']}" for message in messages[1 : 1 + summarized]]
    transcript = [
        {"role": "system", "content": SUMMARY_INSTRUCTION},
        {"role": "user", "content": "\n".join(lines)},
    ]
    thinking_off = {"chat_template_kwargs": {"enable_thinking": False}}
    assert usage["summary_usage"]["prompt_tokens"] == count(transcript, **thinking_off)
    assert count(transcript, **thinking_off) != count(transcript)

    def compacted(summary: str) -> Messages:
        note = {"role": "system", "content": f"{SUMMARY_LABEL}\n{summary}"}
        return [messages[0], note, *messages[1 + summarized :]]

    answer_prompt = usage["prompt_tokens"] - usage["summary_usage"]["prompt_tokens"]
    assert answer_prompt == count(compacted("The summary."))
    assert answer_prompt != count(compacted(REASONED_SUMMARY))


WEATHER_CALL = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }
    ],
}
WEATHER_RESULT = {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 degrees"}


def test_a_summary_reads_tool_calls_as_generation_on_the_fallback_writes_them(
    overflow_client: TestClient, prompt_length: Callable[[Messages], int]
) -> None:
    """The tiny model's template renders no tools (the generic fallback): the summary's prompt
    holds each call and result in the fallback's JSON, rendered by the chat plan as /tokenize
    renders it; before, the calls were left out of the transcript."""
    ask = {"role": "user", "content": "Weather in Paris?"}
    messages = [SYSTEM, ask, WEATHER_CALL, WEATHER_RESULT, *conversation(4)[1:]]
    response, _ = completion(overflow_client, messages, **LONG_ANSWER, context_overflow=SUM)
    assert response.headers["x-context-compacted"] == "summarize; summarized=9"
    calls = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}'
    result = '{"tool_response": {"name": "get_weather", "content": "sunny, 21 degrees"}}'
    lines = ["user: Weather in Paris?", f"assistant: {calls}", f"tool: {result}"]
    lines += [f"{message['role']}: {message['content']}" for message in messages[4:10]]
    transcript = [
        {"role": "system", "content": SUMMARY_INSTRUCTION},
        {"role": "user", "content": "\n".join(lines)},
    ]
    summary = response.json()["usage"]["summary_usage"]
    assert summary["prompt_tokens"] == prompt_length(transcript)


def test_summarize_refuses_when_the_kept_messages_alone_are_too_long(
    overflow_client: TestClient,
) -> None:
    requests_before = engine_requests(overflow_client)
    messages = [*conversation(3)[:-1], {"role": "user", "content": "fig " * 300}]
    response = post(overflow_client, messages, context_overflow="summarize")
    error = error_of(response, 400)
    assert error["code"] == "context_length_exceeded"
    assert "even without the messages to summarize" in error["message"]
    assert engine_requests(overflow_client) == requests_before  # no summary made in vain


# --- error, the per-request switch, the counters ----------------------------------------------


def test_error_policy_names_prompt_max_tokens_and_window(
    client: TestClient, overflow_client: TestClient, prompt_length: Callable[[Messages], int]
) -> None:
    messages = conversation(40)
    prompt = prompt_length(messages)
    expected = (
        f"This model's maximum context length is {TINY_CONTEXT_WINDOW} tokens. However, you "
        f"requested {prompt + MAX_TOKENS} tokens ({prompt} in the prompt, {MAX_TOKENS} for the "
        "completion)."
    )
    for response in (
        post(client, messages),
        post(overflow_client, messages, context_overflow="error"),
        post(client, messages, stream=True),
    ):
        assert response.headers["content-type"].startswith("application/json")
        error = error_of(response, 400)
        assert error["code"] == "context_length_exceeded"
        assert error["message"].startswith(expected)


def test_a_request_policy_needs_the_operators_consent(
    client: TestClient, overflow_client: TestClient
) -> None:
    refused = post(client, conversation(1), context_overflow="truncate")
    error = error_of(refused, 400)
    assert error["param"] == "context_overflow"
    assert error["code"] == "unsupported_parameter"
    assert "--allow-request-overflow-policy" in error["message"]
    unknown = post(overflow_client, conversation(1), context_overflow="compress")
    assert error_of(unknown, 400)["param"] == "context_overflow"


def engine_requests(client: TestClient) -> int:
    count: int = client.get("/v1/mlx/status").json()["counters"]["requests_total"]
    return count


def status(client: TestClient) -> dict[str, Any]:
    body: dict[str, Any] = client.get("/v1/mlx/status").json()["context_overflow"]
    return body


def metric_samples(client: TestClient) -> dict[tuple[str, str], float]:
    samples = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name.startswith("mlx_server_context_"):
            for sample in family.samples:
                samples[(sample.name, sample.labels.get("policy", ""))] = sample.value
    return samples


def test_status_and_metrics_count_what_compaction_did(overflow_client: TestClient) -> None:
    before = status(overflow_client)
    assert before["policy"] == "truncate"
    response, _ = completion(overflow_client, conversation(8))
    dropped = int(response.headers["x-context-compacted"].rsplit("=", 1)[1])
    after = status(overflow_client)
    assert after["truncations"] == before["truncations"] + 1
    assert after["messages_dropped"] == before["messages_dropped"] + dropped
    metrics = metric_samples(overflow_client)
    assert metrics[("mlx_server_context_compactions_total", "truncate")] == after["truncations"]
    assert metrics[("mlx_server_context_compactions_total", "summarize")] == after["summaries"]
    assert metrics[("mlx_server_context_messages_dropped_total", "")] == after["messages_dropped"]
    assert metrics[("mlx_server_context_overflow_refusals_total", "")] == after["refusals"]
    summary_tokens = metrics[("mlx_server_context_summary_tokens_total", "")]
    assert summary_tokens == after["summary_tokens"]


def test_truncate_of_megabytes_renders_only_what_can_fit(overflow_client: TestClient) -> None:
    """2,048 messages of 4 KB (8 MB): the candidates a character count already puts over the
    window are never rendered (whole, this one takes tens of seconds to render and tokenize)."""
    line = "The quick brown fox jumps over the lazy dog, again and again. " * 64
    messages: Messages = [SYSTEM]
    for turn in range(1023):
        messages += [{"role": "user", "content": f"{turn} {line}"}]
        messages += [{"role": "assistant", "content": line}]
    messages.append({"role": "user", "content": "And now?"})
    response = post(overflow_client, messages)
    assert response.status_code == 200, response.text
    assert response.headers["x-context-compacted"] == "truncate; dropped=2046"
