"""Sessions over real HTTP with the `openai` SDK (`session_id` in extra_body): the server keeps
the history, a turn is the whole conversation (same answer, its prefix cached), streamed turns
are saved too, the overflow policy sees the combined history, GET/DELETE, and the TTL."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from openai import OpenAI

from mlx_engine_server.http.app import ServerOptions
from mlx_engine_server.protocols.openai.limits import RequestLimits
from mlx_engine_server.state.sqlite import SqliteStore

from ..conftest import LiveServer, close_after_test, run_live_server, start_engine

TURN = {"model": "m", "max_tokens": 4, "temperature": 0}


def sdk(live: LiveServer) -> OpenAI:
    return close_after_test(OpenAI(base_url=f"{live.base_url}/v1", api_key="unused", max_retries=0))


def test_a_session_turn_is_the_whole_conversation(tiny_server: LiveServer) -> None:
    client, session = sdk(tiny_server), {"session_id": uuid.uuid4().hex}
    hello = {"role": "user", "content": "Hello there"}
    then = {"role": "user", "content": "And then?"}
    first = client.chat.completions.create(messages=[hello], extra_body=session, **TURN)
    second = client.chat.completions.create(messages=[then], extra_body=session, **TURN)
    reply = first.choices[0].message.content
    whole = client.chat.completions.create(
        messages=[hello, {"role": "assistant", "content": reply}, then], **TURN
    )
    assert second.choices[0].message.content == whole.choices[0].message.content
    assert first.usage is not None
    assert second.usage is not None
    assert whole.usage is not None
    assert second.usage.prompt_tokens == whole.usage.prompt_tokens > first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1
    stored = httpx.get(f"{tiny_server.base_url}/v1/sessions/{session['session_id']}").json()
    assert stored["object"] == "session"
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant", "user", "assistant"]
    assert stored["messages"][1]["content"] == reply
    assert stored["messages"][3]["content"] == second.choices[0].message.content


def test_a_streamed_turn_is_saved(tiny_server: LiveServer) -> None:
    client, session_id = sdk(tiny_server), uuid.uuid4().hex
    chunks = client.chat.completions.create(
        messages=[{"role": "user", "content": "Stream it"}],
        stream=True,
        extra_body={"session_id": session_id},
        **TURN,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    stored = httpx.get(f"{tiny_server.base_url}/v1/sessions/{session_id}").json()
    assert stored["messages"][-1] == {"role": "assistant", "content": text}
    deleted = httpx.delete(f"{tiny_server.base_url}/v1/sessions/{session_id}")
    assert deleted.json() == {"id": session_id, "object": "session.deleted", "deleted": True}
    assert httpx.get(f"{tiny_server.base_url}/v1/sessions/{session_id}").status_code == 404
    assert httpx.delete(f"{tiny_server.base_url}/v1/sessions/{session_id}").status_code == 404


def test_the_overflow_policy_sees_the_combined_history(tiny_server: LiveServer) -> None:
    """Each turn alone fits the 256-token window; together they do not (policy: error)."""
    client, session = sdk(tiny_server), {"session_id": uuid.uuid4().hex}
    long_turn = [{"role": "user", "content": "word " * 130}]
    client.chat.completions.create(messages=long_turn, extra_body=session, **TURN)
    client.chat.completions.create(messages=long_turn, **TURN)  # alone: fits
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(messages=long_turn, extra_body=session, **TURN)
    assert refused.value.code == "context_length_exceeded"


def test_bad_session_requests_are_400s(tiny_server: LiveServer) -> None:
    url = f"{tiny_server.base_url}/v1/chat/completions"
    message = [{"role": "user", "content": "Hi"}]
    for fields, param in (({"session_id": "a b"}, "session_id"), ({"n": 2}, "n")):
        body = {**TURN, "messages": message, "session_id": "ok", **fields}
        answer = httpx.post(url, json=body)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == param


def test_a_session_is_forgotten_after_its_ttl(tiny_model_dir: Path) -> None:
    live = run_live_server(start_engine(tiny_model_dir), ServerOptions(session_ttl_s=0.5))
    try:
        sdk(live).chat.completions.create(
            messages=[{"role": "user", "content": "Hi"}], extra_body={"session_id": "short"}, **TURN
        )
        assert httpx.get(f"{live.base_url}/v1/sessions/short").status_code == 200
        time.sleep(0.7)
        assert httpx.get(f"{live.base_url}/v1/sessions/short").status_code == 404
    finally:
        live.stop()


def test_a_session_past_max_messages_keeps_going_on_its_newest_turns(tiny_model_dir: Path) -> None:
    """--max-messages bounds what a client sends; counted on the session's whole history, it
    refused every turn of a long session for good, whatever --context-overflow said."""
    options = ServerOptions(limits=RequestLimits(max_messages=4))
    live = run_live_server(start_engine(tiny_model_dir), options)
    try:
        client, session = sdk(live), {"session_id": "long"}
        system = {"role": "system", "content": "Be brief."}
        client.chat.completions.create(
            messages=[system, {"role": "user", "content": "one"}], extra_body=session, **TURN
        )
        for turn in ("two", "three"):
            client.chat.completions.create(
                messages=[{"role": "user", "content": turn}], extra_body=session, **TURN
            )
        kept = httpx.get(f"{live.base_url}/v1/sessions/long").json()["messages"]
        assert [message["role"] for message in kept] == ["system", "user", "assistant"]
        assert kept[:2] == [system, {"role": "user", "content": "three"}]
        too_many = [{"role": "user", "content": "x"}] * 5  # the request's own: still refused
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(messages=too_many, extra_body=session, **TURN)
        assert refused.value.code == "array_above_max_length"
    finally:
        live.stop()


def _turns_at_once(urls: list[str], session_id: str) -> list[str]:
    """One turn per URL, all sent at the same moment; the user messages they sent."""
    said = [f"turn {index}" for index in range(len(urls))]
    start = threading.Barrier(len(urls))

    def turn(url: str, text: str) -> None:
        start.wait()
        body = {"messages": [{"role": "user", "content": text}], "session_id": session_id}
        answer = httpx.post(f"{url}/v1/chat/completions", json={**TURN, **body}, timeout=60)
        assert answer.status_code == 200, answer.text

    threads = [threading.Thread(target=turn, args=pair) for pair in zip(urls, said, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return said


def _kept_user_messages(url: str, session_id: str) -> list[str]:
    kept = httpx.get(f"{url}/v1/sessions/{session_id}").json()["messages"]
    assert [message["role"] for message in kept] == ["user", "assistant"] * (len(kept) // 2)
    return sorted(message["content"] for message in kept if message["role"] == "user")


def test_turns_sent_at_once_are_all_kept_one_after_another(tiny_server: LiveServer) -> None:
    """Within one instance the turns of a session take turns: the later one is generated on the
    history the earlier one saved, and none overwrites another."""
    session_id = uuid.uuid4().hex
    said = _turns_at_once([tiny_server.base_url] * 3, session_id)
    assert _kept_user_messages(tiny_server.base_url, session_id) == said


def test_two_instances_sharing_a_store_never_drop_a_turn(tiny_model_dir: Path) -> None:
    """Across instances (one store, as with Redis) a turn saved meanwhile is not overwritten:
    the later save goes after it."""
    store = SqliteStore(None)
    engine = start_engine(tiny_model_dir)
    first, second = run_live_server(engine, store=store), run_live_server(engine, store=store)
    try:
        session_id = uuid.uuid4().hex
        said = _turns_at_once([first.base_url, second.base_url] * 2, session_id)
        assert _kept_user_messages(first.base_url, session_id) == said
    finally:
        second.stop()
        first.stop()


def test_a_turn_that_ends_early_lets_the_next_one_in(tiny_server: LiveServer) -> None:
    """The session's lock goes with the turn however it ends: a refused turn, a stream whose
    client leaves after its first event."""
    url, session_id = tiny_server.base_url, uuid.uuid4().hex
    body = {**TURN, "session_id": session_id, "messages": [{"role": "user", "content": "Hi"}]}
    too_long = {**body, "messages": [{"role": "user", "content": "word " * 400}]}
    refused = httpx.post(f"{url}/v1/chat/completions", json=too_long)  # past the 256 tokens
    assert refused.status_code == 400, refused.text
    streamed = {**body, "stream": True, "max_tokens": 64}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=streamed) as stream:
        assert stream.status_code == 200
        next(stream.iter_lines())
    after = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=20)
    assert after.status_code == 200, after.text
