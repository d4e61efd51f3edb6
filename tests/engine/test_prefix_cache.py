"""Prefix KV cache: later turns reuse earlier prefill, answers stay the same, memory bounded."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm.models.cache import ArraysCache, KVCache
from starlette.testclient import TestClient

from mlx_engine_server.engine import EngineOptions
from mlx_engine_server.engine.prefix_cache import PrefixCache
from mlx_engine_server.http.app import create_app

from ..conftest import start_engine

SYSTEM = {"role": "system", "content": "You are a terse assistant who answers in one line."}


def ask(client: TestClient, messages: list[dict[str, str]]) -> dict[str, Any]:
    body = {"messages": messages, "max_tokens": 6, "temperature": 0}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def conversation(client: TestClient) -> list[dict[str, Any]]:
    """Three turns, each resending the whole history, as chat apps do."""
    messages = [SYSTEM, {"role": "user", "content": "Name a colour."}]
    replies = []
    for question in ("Name another.", "And one more?", None):
        reply = ask(client, messages)
        replies.append(reply)
        if question is None:
            break
        answer = reply["choices"][0]["message"]["content"]
        messages += [
            {"role": "assistant", "content": answer},
            {"role": "user", "content": question},
        ]
    return replies


@pytest.fixture
def cached_and_uncached(tiny_model_dir: Path) -> Iterator[tuple[TestClient, TestClient]]:
    cached = create_app(start_engine(tiny_model_dir))
    uncached = create_app(start_engine(tiny_model_dir, EngineOptions(prefix_cache_bytes=0)))
    with TestClient(cached) as with_cache, TestClient(uncached) as without_cache:
        yield with_cache, without_cache


def test_later_turns_reuse_the_conversation_prefix_and_answer_the_same(
    cached_and_uncached: tuple[TestClient, TestClient],
) -> None:
    with_cache, without_cache = cached_and_uncached
    cached_turns = conversation(with_cache)
    plain_turns = conversation(without_cache)
    assert [t["choices"] for t in cached_turns] == [t["choices"] for t in plain_turns]
    first, *later = (turn["usage"] for turn in cached_turns)
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    for usage in later:
        assert usage["prompt_tokens_details"]["cached_tokens"] > first["prompt_tokens"] // 2
        assert usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]
    assert all(t["usage"]["prompt_tokens_details"]["cached_tokens"] == 0 for t in plain_turns)
    status = with_cache.get("/v1/mlx/status").json()["prefix_cache"]
    assert status["hits"] >= len(later)
    assert 0 < status["bytes"] <= status["max_bytes"]
    assert 0 < status["hit_rate"] <= 1
    assert "mlx_server_prefix_cache_hits_total" in with_cache.get("/metrics").text


def test_the_same_prompt_again_reuses_all_but_its_last_token(
    cached_and_uncached: tuple[TestClient, TestClient],
) -> None:
    client, _ = cached_and_uncached
    messages = [SYSTEM, {"role": "user", "content": "Say hi."}]
    first, second = ask(client, messages), ask(client, messages)
    assert second["choices"] == first["choices"]
    usage = second["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1


def test_byte_budget_holds_on_every_insert(tiny_model_dir: Path) -> None:
    one_entry_bytes = 60_000  # tiny-llama caches 512 bytes a token: one or two entries fit
    engine = start_engine(tiny_model_dir, EngineOptions(prefix_cache_bytes=one_entry_bytes))
    with TestClient(create_app(engine)) as client:
        for index in range(6):
            ask(client, [{"role": "user", "content": f"Question {index} " * (index + 1)}])
            cache = client.get("/v1/mlx/status").json()["prefix_cache"]
            assert cache["bytes"] <= one_entry_bytes
        assert 1 <= cache["entries"] < 6


def kv_cache(tokens: int, fill: float) -> list[KVCache]:
    layer = KVCache()
    keys = mx.full((1, 2, tokens, 4), fill)
    layer.update_and_fetch(keys, keys)
    return [layer]


def test_a_hit_shares_arrays_without_changing_the_stored_entry() -> None:
    cache = PrefixCache(max_bytes=1 << 20)
    cache.store([1, 2, 3, 4], kv_cache(4, 1.0))
    hit = cache.lookup([1, 2, 3, 9, 9])
    assert hit.cached_tokens == 3
    assert hit.cache is not None
    (layer,) = hit.cache
    layer.update_and_fetch(mx.full((1, 2, 2, 4), 7.0), mx.full((1, 2, 2, 4), 7.0))
    again = cache.lookup([1, 2, 3, 4, 5])
    assert again.cache is not None
    keys, _ = again.cache[0].keys_and_values()
    assert again.cached_tokens == 4
    assert mx.all(keys == 1.0).item()


def recurrent_cache(fill: float) -> list[ArraysCache]:
    layer = ArraysCache(1)
    layer[0] = mx.full((1, 4), fill)
    return [layer]


def test_a_recurrent_state_is_reused_only_at_its_own_length() -> None:
    """A state that cannot be cut back serves prompts that extend it; the very same prompt
    again (one token must be left to process) falls back to a shorter stored state."""
    cache = PrefixCache(max_bytes=1 << 20)
    cache.store([1, 2], recurrent_cache(2.0))
    cache.store([1, 2, 3, 4], recurrent_cache(4.0))
    assert cache.lookup([1, 2, 3, 4, 5]).cached_tokens == 4
    assert cache.lookup([1, 2, 3, 9]).cached_tokens == 2  # branches after [1, 2]
    again = cache.lookup([1, 2, 3, 4])
    assert again.cached_tokens == 2
    assert again.cache is not None
    assert mx.all(again.cache[0][0] == 2.0).item()
    assert cache.lookup([1, 9]).cache is None


def test_lookup_prefers_the_longest_prefix_and_keeps_one_token_to_process() -> None:
    cache = PrefixCache(max_bytes=1 << 20)
    cache.store([5, 6], kv_cache(2, 0.0))
    cache.store([1, 2, 3], kv_cache(3, 0.0))
    assert cache.lookup([1, 2, 3]).cached_tokens == 2
    assert cache.lookup([1, 2, 3, 4]).cached_tokens == 3
    assert cache.lookup([5, 6, 7]).cached_tokens == 2
    assert cache.lookup([8, 9]).cache is None
    assert cache.stats().misses == 1


def test_storing_a_longer_sequence_replaces_its_prefixes() -> None:
    cache = PrefixCache(max_bytes=1 << 20)
    cache.store([1, 2], kv_cache(2, 0.0))
    cache.store([1, 2, 3, 4], kv_cache(4, 0.0))
    stats = cache.stats()
    assert stats.entries == 1
    assert stats.bytes == sum(layer.nbytes for layer in kv_cache(4, 0.0))


def longest_shared_prefix(stored: list[list[int]], prompt: list[int]) -> int:
    shared = 0
    for tokens in stored:
        length = 0
        while length < min(len(tokens), len(prompt)) and tokens[length] == prompt[length]:
            length += 1
        shared = max(shared, length)
    return min(shared, len(prompt) - 1)


SHARED_HISTORY = [7 + index % 5 for index in range(150)]  # longer than one compared block
token_lists = st.lists(st.integers(0, 3), min_size=1, max_size=12) | st.builds(
    lambda cut, tail: SHARED_HISTORY[:cut] + tail,
    st.integers(0, len(SHARED_HISTORY)),
    st.lists(st.integers(0, 12), max_size=6),
).filter(bool)


@settings(max_examples=60, deadline=None)
@given(stores=st.lists(token_lists, max_size=12), prompts=st.lists(token_lists, max_size=8))
def test_lookup_finds_the_longest_shared_prefix_among_many_entries(
    stores: list[list[int]], prompts: list[list[int]]
) -> None:
    cache = PrefixCache(max_bytes=1 << 30)
    kept: list[list[int]] = []
    for tokens in stores:
        cache.store(tokens, kv_cache(len(tokens), 0.0))
        kept = [t for t in kept if t != tokens and t != tokens[: len(t)]] + [tokens]
    assert cache.stats().entries == len(kept)
    for prompt in prompts:
        assert cache.lookup(prompt).cached_tokens == longest_shared_prefix(kept, prompt)
    cache.shrink_to(0)
    assert cache.stats().entries == cache.bytes == 0
    assert cache.lookup([*SHARED_HISTORY, 1]).cache is None


@settings(max_examples=60, deadline=None)
@given(stores=st.lists(token_lists, max_size=16), prompts=st.lists(token_lists, max_size=8))
def test_lookups_stay_right_while_the_byte_budget_evicts(
    stores: list[list[int]], prompts: list[list[int]]
) -> None:
    def size(tokens: list[int]) -> int:
        return sum(layer.nbytes for layer in kv_cache(len(tokens), 0.0))

    budget = 5 * size([0]) // 2  # room for two prompts
    cache = PrefixCache(max_bytes=budget)
    for tokens in stores:
        cache.store(tokens, kv_cache(len(tokens), 0.0))
        cache.lookup([*tokens[:-1], 9])  # hits reorder the LRU
    kept = [list(tokens) for _, tokens in cache._entries]
    assert cache.bytes == sum(size(tokens) for tokens in kept) <= budget
    for prompt in prompts:
        assert cache.lookup(prompt).cached_tokens == longest_shared_prefix(kept, prompt)
    cache.shrink_to(0)
    assert cache.stats().entries == cache.bytes == 0
    assert cache.lookup([*SHARED_HISTORY, 1]).cache is None


def test_evicting_one_branch_keeps_its_sibling_findable() -> None:
    entry_bytes = sum(layer.nbytes for layer in kv_cache(3, 0.0))
    cache = PrefixCache(max_bytes=2 * entry_bytes)
    cache.store([1, 2, 3], kv_cache(3, 0.0))
    cache.store([1, 2, 4], kv_cache(3, 0.0))  # branches off the first after two tokens
    cache.store([5, 6, 7], kv_cache(3, 0.0))  # evicts [1, 2, 3], the least recently used
    assert cache.stats().entries == 2
    assert cache.lookup([1, 2, 4, 8]).cached_tokens == 3
    assert cache.lookup([1, 2, 3, 8]).cached_tokens == 2
