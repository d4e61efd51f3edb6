"""The state store's one interface: records, their ordered items, and rate counters.

A record is a JSON object under (owner, kind, id); `owner` is a hash of the API key (or of
nothing, without keys), so one key never reads another's records. Items are a record's ordered
list (a response's input items, a conversation's items), deleted with it; an id appears in a
list once, at the place it was first added. Counters add up a
key's requests and tokens within a fixed window. Every method is a coroutine that keeps the
event loop free: SQLite runs on a thread of its own, Redis through its asyncio client.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

Json = dict[str, Any]
DEFAULT_RETENTION_S = 30 * 24 * 3600.0  # OpenAI keeps stored responses 30 days
DEFAULT_MAX_RECORDS = 100_000
NO_OWNER = "-"


def owner_of(api_key: bytes | None) -> str:
    """The owner id of a key: a hash, so the store never holds a key itself."""
    if api_key is None:
        return NO_OWNER
    return hashlib.sha256(b"mlx-engine-server:" + api_key).hexdigest()[:32]


@dataclass(frozen=True)
class RecordKey:
    owner: str
    kind: str  # "response", "conversation", "session"
    id: str


@dataclass(frozen=True)
class ItemPage:
    items: list[Json]
    has_more: bool


@dataclass(frozen=True)
class WindowCount:
    """A counter key's use in the current window, this request included."""

    requests: int
    tokens: int
    reset_s: float  # until the window ends


@dataclass(frozen=True)
class Retention:
    """How long records live when no TTL is given, and how many are kept at most."""

    max_age_s: float = DEFAULT_RETENTION_S
    max_records: int = DEFAULT_MAX_RECORDS


class StateStore(Protocol):
    async def put(
        self, key: RecordKey, body: Json, items: Sequence[Json] = (), ttl_s: float | None = None
    ) -> None:
        """Write (or replace) a record and append `items` to it, in one durable step."""

    async def replace(
        self, key: RecordKey, body: Json, expected: Json | None, ttl_s: float | None = None
    ) -> bool:
        """Write the record only while it still holds `expected` (None: only while there is
        none); False, writing nothing, when another writer changed it first."""

    async def get(self, key: RecordKey) -> Json | None: ...

    async def delete(self, key: RecordKey) -> bool:
        """Remove a record and its items; False when there was none."""

    async def add_items(self, key: RecordKey, items: Sequence[Json]) -> bool:
        """Append items (each with an `id`) to an existing record; False when there is none.
        An item whose id the record already holds keeps its place; its body is replaced."""

    async def list_items(
        self, key: RecordKey, *, limit: int, after: str | None = None, descending: bool = False
    ) -> ItemPage: ...

    async def get_item(self, key: RecordKey, item_id: str) -> Json | None: ...

    async def delete_item(self, key: RecordKey, item_id: str) -> bool: ...

    async def count(self, counter: str, window_s: int, requests: int, tokens: int) -> WindowCount:
        """Add to a counter's current window and return its totals."""

    async def close(self) -> None: ...
