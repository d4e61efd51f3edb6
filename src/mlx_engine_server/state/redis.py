"""The shared state store: Redis (`--state-url redis://...`), for several instances behind one
proxy. The same records, items and counters as SQLite, through redis-py's asyncio client.

A record is a JSON string with the retention (or the session's TTL) as its expiry; its items
are a list of ids and a hash of bodies with the same expiry. Retention here is by age only:
Redis's own `maxmemory` policy bounds the count. Durability is Redis's (appendonly).
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis

from ..errors import StartupError, StateUnavailableError
from .store import ItemPage, Json, RecordKey, Retention, WindowCount

PREFIX = "mlx-state"
CONNECT_TIMEOUT_S = 5.0
# KEYS: the order list, the bodies hash; ARGV: id, body, id, body, ...
PUSH_ITEMS = """
for i = 1, #ARGV, 2 do
  if redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('RPUSH', KEYS[1], ARGV[i])
  end
end
return 0
"""
Method = TypeVar("Method", bound=Callable[..., Awaitable[Any]])


def check_reachable(url: str) -> None:
    """At start-up: a Redis server that does not answer is an error now, not at the first
    request. The message names host and port only: the URL may hold a password."""
    parts = urlsplit(url)
    where = f"{parts.hostname}:{parts.port or 6379}"
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT_S) as client:
            client.ping()
    except (redis.RedisError, OSError, ValueError) as exc:
        raise StartupError(
            f"cannot reach the Redis state store at {where} ({type(exc).__name__}); "
            "check --state-url"
        ) from None


def _unavailable_on_failure(method: Method) -> Method:
    """A Redis failure is the client's 503 (the server keeps serving), not a stray exception."""

    @functools.wraps(method)
    async def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            return await method(*args, **kwargs)
        except (redis.RedisError, OSError) as exc:
            raise StateUnavailableError(f"The state store failed: {type(exc).__name__}.") from exc

    return cast(Method, guarded)


class RedisStore:
    def __init__(self, url: str, retention: Retention | None = None) -> None:
        self.retention = retention or Retention()
        self._redis = aioredis.Redis.from_url(url, decode_responses=True)

    @_unavailable_on_failure
    async def put(
        self, key: RecordKey, body: Json, items: Sequence[Json] = (), ttl_s: float | None = None
    ) -> None:
        ttl_ms = int(1000 * (ttl_s if ttl_s is not None else self.retention.max_age_s))
        if ttl_ms <= 0:
            await self.delete(key)
            return
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(_record(key), _dumps(body), px=ttl_ms)
            _push_items(pipe, key, items)
            pipe.pexpire(_order(key), ttl_ms)
            pipe.pexpire(_bodies(key), ttl_ms)
            await pipe.execute()

    @_unavailable_on_failure
    async def replace(
        self, key: RecordKey, body: Json, expected: Json | None, ttl_s: float | None = None
    ) -> bool:
        ttl_ms = int(1000 * (ttl_s if ttl_s is not None else self.retention.max_age_s))
        async with self._redis.pipeline(transaction=True) as pipe:
            await pipe.watch(_record(key))
            text = await pipe.get(_record(key))
            if (None if text is None else _loads(text)) != expected:
                return False
            pipe.multi()  # type: ignore[no-untyped-call]
            pipe.set(_record(key), _dumps(body), px=max(ttl_ms, 1))
            try:
                await pipe.execute()
            except redis.WatchError:
                return False
        return True

    @_unavailable_on_failure
    async def get(self, key: RecordKey) -> Json | None:
        text = await self._redis.get(_record(key))
        return None if text is None else _loads(text)

    @_unavailable_on_failure
    async def delete(self, key: RecordKey) -> bool:
        gone = await self._redis.delete(_record(key), _order(key), _bodies(key))
        return bool(gone)

    @_unavailable_on_failure
    async def add_items(self, key: RecordKey, items: Sequence[Json]) -> bool:
        ttl_ms = await self._redis.pttl(_record(key))
        if ttl_ms is None or ttl_ms < 0:
            return False
        async with self._redis.pipeline(transaction=True) as pipe:
            _push_items(pipe, key, items)
            pipe.pexpire(_order(key), ttl_ms)
            pipe.pexpire(_bodies(key), ttl_ms)
            await pipe.execute()
        return True

    @_unavailable_on_failure
    async def list_items(
        self, key: RecordKey, *, limit: int, after: str | None = None, descending: bool = False
    ) -> ItemPage:
        ids = [str(item_id) for item_id in await self._redis.lrange(_order(key), 0, -1)]
        if descending:
            ids.reverse()
        if after is not None and after in ids:
            ids = ids[ids.index(after) + 1 :]
        page = ids[: limit + 1]
        if not page:
            return ItemPage([], False)
        bodies = await self._redis.hmget(_bodies(key), page[:limit])
        return ItemPage([_loads(body) for body in bodies if body is not None], len(page) > limit)

    @_unavailable_on_failure
    async def get_item(self, key: RecordKey, item_id: str) -> Json | None:
        text = await self._redis.hget(_bodies(key), item_id)
        return None if text is None else _loads(text)

    @_unavailable_on_failure
    async def delete_item(self, key: RecordKey, item_id: str) -> bool:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hdel(_bodies(key), item_id)
            pipe.lrem(_order(key), 0, item_id)
            removed, _ = await pipe.execute()
        return bool(removed)

    @_unavailable_on_failure
    async def count(self, counter: str, window_s: int, requests: int, tokens: int) -> WindowCount:
        now = time.time()
        window = int(now // window_s) * window_s
        name = f"{PREFIX}:c:{counter}:{window}"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(name, "requests", requests)
            pipe.hincrby(name, "tokens", tokens)
            pipe.expire(name, 2 * window_s)
            used_requests, used_tokens, _ = await pipe.execute()
        return WindowCount(int(used_requests), int(used_tokens), window + window_s - now)

    async def close(self) -> None:
        await self._redis.aclose()


def _push_items(pipe: aioredis.client.Pipeline, key: RecordKey, items: Sequence[Json]) -> None:
    """A repeated id keeps its first place, as in the SQLite store: in one script, so that
    the check and the push are one step for every instance sharing the server."""
    if items:
        pairs = [part for item in items for part in (item["id"], _dumps(item))]
        pipe.eval(PUSH_ITEMS, 2, _order(key), _bodies(key), *pairs)


def _name(key: RecordKey) -> str:
    return f"{key.owner}:{key.kind}:{key.id}"


def _record(key: RecordKey) -> str:
    return f"{PREFIX}:r:{_name(key)}"


def _order(key: RecordKey) -> str:
    return f"{PREFIX}:l:{_name(key)}"


def _bodies(key: RecordKey) -> str:
    return f"{PREFIX}:i:{_name(key)}"


def _dumps(value: Json) -> str:
    return json.dumps(value, separators=(",", ":"))


def _loads(text: str | bytes) -> Json:
    value: Json = json.loads(text)
    return value
