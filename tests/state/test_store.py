"""The state store's contract, run against each backend (SQLite, and a real Redis server):
records, items, owners, expiry, counters."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from mlx_engine_server.errors import StartupError
from mlx_engine_server.state.open import open_store
from mlx_engine_server.state.redis import RedisStore
from mlx_engine_server.state.sqlite import SqliteStore
from mlx_engine_server.state.store import RecordKey, Retention, StateStore, owner_of

from .conftest import free_port

ALICE, BOB = owner_of(b"alice-key"), owner_of(b"bob-key")
Scenario = Callable[[StateStore], Awaitable[None]]


@pytest.fixture(params=["sqlite", "redis"])
def on_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[Scenario], None]:
    """Runs a scenario on a fresh store of the backend, inside one event loop."""
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")

        def make() -> StateStore:
            return RedisStore(url)
    else:

        def make() -> StateStore:
            return SqliteStore(tmp_path / "state.sqlite3")

    def run(scenario: Scenario) -> None:
        async def main() -> None:
            store = make()
            try:
                await scenario(store)
            finally:
                await store.close()

        asyncio.run(main())

    return run


def fresh(owner: str, kind: str) -> RecordKey:
    """A key no earlier test used (the Redis server lives for the session)."""
    return RecordKey(owner, kind, uuid.uuid4().hex)


def test_a_record_and_its_items_are_read_back_by_their_owner_only(
    on_store: Callable[[Scenario], None],
) -> None:
    async def scenario(store: StateStore) -> None:
        key = fresh(ALICE, "response")
        bobs = RecordKey(BOB, key.kind, key.id)
        items = [{"id": f"msg_{i}", "text": str(i)} for i in range(5)]
        await store.put(key, {"hello": "world"}, items)
        assert await store.get(key) == {"hello": "world"}
        assert await store.get(bobs) is None
        page = await store.list_items(key, limit=2)
        assert [item["id"] for item in page.items] == ["msg_0", "msg_1"]
        assert page.has_more
        page = await store.list_items(key, limit=10, after="msg_1", descending=True)
        assert [item["id"] for item in page.items] == ["msg_0"]
        assert not page.has_more
        assert (await store.list_items(bobs, limit=10)).items == []
        assert await store.get_item(key, "msg_3") == {"id": "msg_3", "text": "3"}
        assert await store.get_item(bobs, "msg_3") is None
        assert await store.delete_item(key, "msg_3")
        assert not await store.delete_item(key, "msg_3")
        assert not await store.delete(bobs)
        assert await store.delete(key)
        assert await store.get(key) is None
        assert (await store.list_items(key, limit=10)).items == []

    on_store(scenario)


def test_items_are_added_only_to_an_existing_record(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: StateStore) -> None:
        key = fresh(ALICE, "conversation")
        assert not await store.add_items(key, [{"id": "a"}])
        await store.put(key, {})
        assert await store.add_items(key, [{"id": "a"}, {"id": "b"}])
        await store.put(key, {"metadata": 1})  # replacing the body keeps the items
        assert [item["id"] for item in (await store.list_items(key, limit=9)).items] == ["a", "b"]

    on_store(scenario)


def test_a_repeated_item_id_keeps_its_first_place_with_its_newest_body(
    on_store: Callable[[Scenario], None],
) -> None:
    async def scenario(store: StateStore) -> None:
        key = fresh(ALICE, "conversation")
        await store.put(key, {}, [{"id": "a", "v": 1}, {"id": "b"}, {"id": "a", "v": 2}])
        assert await store.add_items(key, [{"id": "c"}, {"id": "b", "v": 3}])
        page = await store.list_items(key, limit=9)
        assert page.items == [{"id": "a", "v": 2}, {"id": "b", "v": 3}, {"id": "c"}]
        assert await store.delete_item(key, "a")
        assert [item["id"] for item in (await store.list_items(key, limit=9)).items] == ["b", "c"]

    on_store(scenario)


def test_replace_writes_only_over_the_record_it_expects(
    on_store: Callable[[Scenario], None],
) -> None:
    async def scenario(store: StateStore) -> None:
        key = fresh(ALICE, "session")
        assert await store.replace(key, {"turn": 1}, expected=None)
        assert not await store.replace(key, {"turn": 1}, expected=None)
        assert not await store.replace(key, {"turn": 2}, expected={"turn": 0})
        assert await store.get(key) == {"turn": 1}
        assert await store.replace(key, {"turn": 2}, expected={"turn": 1}, ttl_s=60)
        assert await store.get(key) == {"turn": 2}

    on_store(scenario)


def test_an_expired_record_is_gone(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: StateStore) -> None:
        key = fresh(ALICE, "session")
        await store.put(key, {"x": 1}, ttl_s=0.05)
        assert await store.get(key) == {"x": 1}
        await asyncio.sleep(0.15)
        assert await store.get(key) is None
        assert not await store.add_items(key, [{"id": "a"}])

    on_store(scenario)


def test_counters_add_up_within_a_window(on_store: Callable[[Scenario], None]) -> None:
    async def scenario(store: StateStore) -> None:
        counter = uuid.uuid4().hex
        first = await store.count(counter, 60, 1, 0)
        second = await store.count(counter, 60, 1, 25)
        assert (first.requests, first.tokens) == (1, 0)
        assert (second.requests, second.tokens) == (2, 25)
        assert 0 < second.reset_s <= 60

    on_store(scenario)


def test_the_oldest_sqlite_records_beyond_the_retention_count_go(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"

    async def fill() -> None:
        store = SqliteStore(path, Retention(max_records=3))
        for index in range(5):
            await store.put(RecordKey(ALICE, "response", str(index)), {"n": index})
        await store.close()

    async def read() -> list[object]:
        store = SqliteStore(path, Retention(max_records=3))  # prunes on opening
        kept = [await store.get(RecordKey(ALICE, "response", str(i))) for i in range(5)]
        await store.close()
        return kept

    asyncio.run(fill())
    assert asyncio.run(read()) == [None, None, {"n": 2}, {"n": 3}, {"n": 4}]


def test_owners_are_hashes_of_keys() -> None:
    assert ALICE != BOB
    assert "alice" not in ALICE
    assert owner_of(b"alice-key") == ALICE


def test_a_state_dir_that_cannot_be_made_is_a_startup_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory", encoding="utf-8")
    with pytest.raises(StartupError, match="--state-dir"):
        SqliteStore(blocker / "state" / "state.sqlite3")


def test_open_store_checks_that_redis_answers(redis_url: str, tmp_path: Path) -> None:
    store = open_store(tmp_path, redis_url, Retention())
    assert isinstance(store, RedisStore)
    asyncio.run(store.close())
    port = free_port()  # nothing listens there
    with pytest.raises(StartupError, match=f"127.0.0.1:{port}") as error:
        open_store(tmp_path, f"redis://:secret@127.0.0.1:{port}/0", Retention())
    assert "secret" not in str(error.value)
    assert isinstance(open_store(tmp_path, None, Retention()), SqliteStore)
