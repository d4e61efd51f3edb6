"""Opening the configured store: Redis when a URL is given, else SQLite in a directory."""

from __future__ import annotations

from pathlib import Path

from .sqlite import STATE_FILE, SqliteStore
from .store import Retention, StateStore


def open_store(directory: Path, url: str | None, retention: Retention) -> StateStore:
    if url is not None:
        from .redis import RedisStore, check_reachable  # noqa: PLC0415 - an optional extra

        check_reachable(url)
        return RedisStore(url, retention)
    return SqliteStore(directory / STATE_FILE, retention)
