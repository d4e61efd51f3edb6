"""The state store's contract, run against each backend: records, items, owners, counters."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlx_engine_server.state.sqlite import SqliteStore
from mlx_engine_server.state.store import RecordKey, Retention, StateStore, owner_of

ALICE, BOB = owner_of(b"alice-key"), owner_of(b"bob-key")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    opened = SqliteStore(tmp_path / "state.sqlite3")
    yield opened
    asyncio.run(opened.close())


def run(coroutine):  # type: ignore[no-untyped-def]
    return asyncio.run(coroutine)


def test_a_record_and_its_items_are_read_back_by_their_owner_only(store: StateStore) -> None:
    key = RecordKey(ALICE, "response", "resp_1")
    items = [{"id": f"msg_{i}", "text": str(i)} for i in range(5)]
    run(store.put(key, {"hello": "world"}, items))
    assert run(store.get(key)) == {"hello": "world"}
    assert run(store.get(RecordKey(BOB, "response", "resp_1"))) is None
    page = run(store.list_items(key, limit=2))
    assert [item["id"] for item in page.items] == ["msg_0", "msg_1"]
    assert page.has_more
    page = run(store.list_items(key, limit=10, after="msg_1", descending=True))
    assert [item["id"] for item in page.items] == ["msg_0"]
    assert not page.has_more
    assert run(store.list_items(RecordKey(BOB, "response", "resp_1"), limit=10)).items == []
    assert run(store.get_item(key, "msg_3")) == {"id": "msg_3", "text": "3"}
    assert run(store.delete_item(key, "msg_3"))
    assert not run(store.delete_item(key, "msg_3"))
    assert not run(store.delete(RecordKey(BOB, "response", "resp_1")))
    assert run(store.delete(key))
    assert run(store.get(key)) is None
    assert run(store.list_items(key, limit=10)).items == []


def test_items_are_added_only_to_an_existing_record(store: StateStore) -> None:
    key = RecordKey(ALICE, "conversation", "conv_1")
    assert not run(store.add_items(key, [{"id": "a"}]))
    run(store.put(key, {}))
    assert run(store.add_items(key, [{"id": "a"}, {"id": "b"}]))
    assert [item["id"] for item in run(store.list_items(key, limit=9)).items] == ["a", "b"]


def test_an_expired_record_is_gone(store: StateStore) -> None:
    key = RecordKey(ALICE, "session", "s")
    run(store.put(key, {"x": 1}, ttl_s=-1.0))
    assert run(store.get(key)) is None


def test_counters_add_up_within_a_window(store: StateStore) -> None:
    first = run(store.count("k", 60, 1, 0))
    second = run(store.count("k", 60, 1, 25))
    assert (second.requests, second.tokens) == (first.requests + 1, first.tokens + 25)
    assert 0 < second.reset_s <= 60


def test_the_oldest_records_beyond_the_retention_count_go(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    store = SqliteStore(path, Retention(max_records=3))
    for index in range(5):
        run(store.put(RecordKey(ALICE, "response", str(index)), {"n": index}))
    run(store.close())
    store = SqliteStore(path, Retention(max_records=3))  # prunes on opening
    kept = [run(store.get(RecordKey(ALICE, "response", str(index)))) for index in range(5)]
    run(store.close())
    assert kept == [None, None, {"n": 2}, {"n": 3}, {"n": 4}]


def test_owners_are_hashes_of_keys() -> None:
    assert ALICE != BOB
    assert "alice" not in ALICE
    assert owner_of(b"alice-key") == ALICE
