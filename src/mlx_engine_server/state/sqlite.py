"""The default state store: one SQLite file (stdlib sqlite3), used from one thread of its own.

WAL mode with `synchronous=FULL`: a record is on disk when its coroutine returns, so a finished
response survives `kill -9` of the server (and a power cut). Rate counters go through a second
connection with `synchronous=NORMAL`: a commit is in the WAL file at once (it survives `kill -9`),
but without an fsync each (a power cut may lose the last counts; fsyncs cost 5-10 ms here).
The event loop never waits on the file: every statement runs on the store's thread. Expired
records go at start-up and every PRUNE_EVERY writes, and so do the oldest beyond `max_records`.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from ..errors import StartupError, StateUnavailableError
from .store import ItemPage, Json, RecordKey, Retention, WindowCount

T = TypeVar("T")
PRUNE_EVERY = 256
COUNTER_KEEP_S = 3600  # past windows are never read again
SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    owner TEXT NOT NULL, kind TEXT NOT NULL, id TEXT NOT NULL, body TEXT NOT NULL,
    created_at REAL NOT NULL, expires_at REAL NOT NULL, PRIMARY KEY (owner, kind, id));
CREATE INDEX IF NOT EXISTS records_expiry ON records (expires_at);
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, owner TEXT NOT NULL, kind TEXT NOT NULL,
    parent TEXT NOT NULL, id TEXT NOT NULL, body TEXT NOT NULL,
    UNIQUE (owner, kind, parent, id));
CREATE INDEX IF NOT EXISTS items_parent ON items (owner, kind, parent, seq);
CREATE TABLE IF NOT EXISTS counters (
    counter TEXT NOT NULL, window INTEGER NOT NULL, requests INTEGER NOT NULL,
    tokens INTEGER NOT NULL, PRIMARY KEY (counter, window));
"""
STATE_FILE = "state.sqlite3"


class SqliteStore:
    """`path` None: an in-memory database (tests, `create_app` without a store)."""

    def __init__(self, path: Path | None, retention: Retention | None = None) -> None:
        self.path = path
        self.retention = retention or Retention()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="state-sqlite")
        self._db: sqlite3.Connection | None = None
        self._counters_db: sqlite3.Connection | None = None
        self._writes = 0
        try:
            self._thread.submit(self._open).result()
        except (OSError, sqlite3.Error) as exc:
            self._thread.shutdown(wait=False)
            where = self.path if self.path is not None else "memory"
            raise StartupError(
                f"cannot open the state store {where}: {exc}; choose another --state-dir"
            ) from None

    def _open(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = _connect(self.path, "FULL")
        self._db.executescript(SCHEMA)
        # in memory, a second connection would be a second database
        self._counters_db = _connect(self.path, "NORMAL") if self.path is not None else self._db
        self._prune()

    async def _run(self, work: Callable[[], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._thread, work)
        except sqlite3.Error as exc:
            raise StateUnavailableError(f"The state store failed: {type(exc).__name__}.") from exc

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the state store is closed")
        return self._db

    # --- records ------------------------------------------------------------------------------

    async def put(
        self, key: RecordKey, body: Json, items: Sequence[Json] = (), ttl_s: float | None = None
    ) -> None:
        now = time.time()
        expires = now + (ttl_s if ttl_s is not None else self.retention.max_age_s)
        text = json.dumps(body, separators=(",", ":"))

        def write() -> None:
            db = self._conn()
            with _transaction(db):
                _upsert(db, key, text, now, expires)
                _insert_items(db, key, items)
            self._count_write()

        await self._run(write)

    async def replace(
        self, key: RecordKey, body: Json, expected: Json | None, ttl_s: float | None = None
    ) -> bool:
        now = time.time()
        expires = now + (ttl_s if ttl_s is not None else self.retention.max_age_s)
        text = json.dumps(body, separators=(",", ":"))

        def write() -> bool:
            db = self._conn()
            with _transaction(db):
                if _current(db, key) != expected:
                    return False
                _upsert(db, key, text, now, expires)
            self._count_write()
            return True

        return await self._run(write)

    async def get(self, key: RecordKey) -> Json | None:
        def read() -> Json | None:
            row = (
                self._conn()
                .execute(
                    "SELECT body FROM records WHERE owner = ? AND kind = ? AND id = ? "
                    "AND expires_at > ?",
                    (key.owner, key.kind, key.id, time.time()),
                )
                .fetchone()
            )
            return None if row is None else _loads(row[0])

        return await self._run(read)

    async def delete(self, key: RecordKey) -> bool:
        def remove() -> bool:
            db = self._conn()
            with _transaction(db):
                gone = db.execute(
                    "DELETE FROM records WHERE owner = ? AND kind = ? AND id = ?", _args(key)
                ).rowcount
                db.execute(
                    "DELETE FROM items WHERE owner = ? AND kind = ? AND parent = ?", _args(key)
                )
            return gone > 0

        return await self._run(remove)

    # --- items --------------------------------------------------------------------------------

    async def add_items(self, key: RecordKey, items: Sequence[Json]) -> bool:
        def append() -> bool:
            db = self._conn()
            with _transaction(db):
                if not _exists(db, key):
                    return False
                _insert_items(db, key, items)
            self._count_write()
            return True

        return await self._run(append)

    async def list_items(
        self, key: RecordKey, *, limit: int, after: str | None = None, descending: bool = False
    ) -> ItemPage:
        def read() -> ItemPage:
            db = self._conn()
            order, compare = ("DESC", "<") if descending else ("ASC", ">")
            start = _item_seq(db, key, after) if after is not None else None
            query = "SELECT body FROM items WHERE owner = ? AND kind = ? AND parent = ?"
            args: list[object] = list(_args(key))
            if start is not None:
                query += f" AND seq {compare} ?"
                args.append(start)
            query += f" ORDER BY seq {order} LIMIT ?"
            args.append(limit + 1)
            rows = [_loads(body) for (body,) in db.execute(query, args)]
            return ItemPage(rows[:limit], len(rows) > limit)

        return await self._run(read)

    async def get_item(self, key: RecordKey, item_id: str) -> Json | None:
        def read() -> Json | None:
            row = (
                self._conn()
                .execute(
                    "SELECT body FROM items WHERE owner = ? AND kind = ? AND parent = ? AND id = ?",
                    (*_args(key), item_id),
                )
                .fetchone()
            )
            return None if row is None else _loads(row[0])

        return await self._run(read)

    async def delete_item(self, key: RecordKey, item_id: str) -> bool:
        def remove() -> bool:
            gone = (
                self._conn()
                .execute(
                    "DELETE FROM items WHERE owner = ? AND kind = ? AND parent = ? AND id = ?",
                    (*_args(key), item_id),
                )
                .rowcount
            )
            return gone > 0

        return await self._run(remove)

    # --- counters -----------------------------------------------------------------------------

    async def count(self, counter: str, window_s: int, requests: int, tokens: int) -> WindowCount:
        def add() -> WindowCount:
            now = time.time()
            window = int(now // window_s) * window_s  # the window's start, in seconds
            if self._counters_db is None:
                raise RuntimeError("the state store is closed")
            row = self._counters_db.execute(
                "INSERT INTO counters VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
                "requests = requests + excluded.requests, tokens = tokens + excluded.tokens "
                "RETURNING requests, tokens",
                (counter, window, requests, tokens),
            ).fetchone()
            return WindowCount(row[0], row[1], window + window_s - now)

        return await self._run(add)

    async def close(self) -> None:
        def shut() -> None:
            if self._counters_db is not None and self._counters_db is not self._db:
                self._counters_db.close()
            if self._db is not None:
                self._db.close()
            self._db = self._counters_db = None

        await self._run(shut)
        self._thread.shutdown(wait=True)

    # --- retention ----------------------------------------------------------------------------

    def _count_write(self) -> None:
        self._writes += 1
        if self._writes % PRUNE_EVERY == 0:
            self._prune()

    def _prune(self) -> None:
        """Expired records, the oldest beyond max_records, their items, and past windows."""
        db = self._conn()
        now = time.time()
        with _transaction(db):
            db.execute("DELETE FROM records WHERE expires_at <= ?", (now,))
            db.execute(
                "DELETE FROM records WHERE rowid IN (SELECT rowid FROM records "
                "ORDER BY created_at DESC LIMIT -1 OFFSET ?)",
                (self.retention.max_records,),
            )
            db.execute(
                "DELETE FROM items WHERE NOT EXISTS (SELECT 1 FROM records r WHERE "
                "r.owner = items.owner AND r.kind = items.kind AND r.id = items.parent)"
            )
            db.execute("DELETE FROM counters WHERE window < ?", (now - COUNTER_KEEP_S,))


def _connect(path: Path | None, synchronous: str) -> sqlite3.Connection:
    target = str(path) if path is not None else ":memory:"
    db = sqlite3.connect(target, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    db.execute("PRAGMA busy_timeout=5000")
    return db


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on an error): the connection is in autocommit mode."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if kind is not None else "COMMIT")


def _args(key: RecordKey) -> tuple[str, str, str]:
    return (key.owner, key.kind, key.id)


def _exists(db: sqlite3.Connection, key: RecordKey) -> bool:
    row = db.execute(
        "SELECT 1 FROM records WHERE owner = ? AND kind = ? AND id = ? AND expires_at > ?",
        (*_args(key), time.time()),
    ).fetchone()
    return row is not None


def _upsert(db: sqlite3.Connection, key: RecordKey, text: str, now: float, expires: float) -> None:
    db.execute(
        "INSERT INTO records VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET "
        "body = excluded.body, expires_at = excluded.expires_at",
        (key.owner, key.kind, key.id, text, now, expires),
    )


def _current(db: sqlite3.Connection, key: RecordKey) -> Json | None:
    row = db.execute(
        "SELECT body FROM records WHERE owner = ? AND kind = ? AND id = ? AND expires_at > ?",
        (*_args(key), time.time()),
    ).fetchone()
    return None if row is None else _loads(row[0])


def _insert_items(db: sqlite3.Connection, key: RecordKey, items: Sequence[Json]) -> None:
    """A repeated id keeps its first place (its `seq`), as in the Redis store."""
    db.executemany(
        "INSERT INTO items (owner, kind, parent, id, body) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (owner, kind, parent, id) DO UPDATE SET body = excluded.body",
        [(*_args(key), item["id"], json.dumps(item, separators=(",", ":"))) for item in items],
    )


def _item_seq(db: sqlite3.Connection, key: RecordKey, item_id: str) -> int | None:
    row = db.execute(
        "SELECT seq FROM items WHERE owner = ? AND kind = ? AND parent = ? AND id = ?",
        (*_args(key), item_id),
    ).fetchone()
    return None if row is None else int(row[0])


def _loads(text: str) -> Json:
    value: Json = json.loads(text)
    return value
