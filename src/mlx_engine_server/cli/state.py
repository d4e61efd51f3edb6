"""The state store and the rate-limit policy, as the settings describe them."""

from __future__ import annotations

from ..state.limits import RateLimits, RatePolicy
from ..state.open import open_store
from ..state.store import Retention, StateStore, owner_of
from .config import Settings
from .keys import read_key_limits


def state_store(settings: Settings) -> StateStore:
    directory = settings.state_dir or settings.cache_dir / "state"
    retention = Retention(settings.state_retention_s, settings.state_max_records)
    return open_store(directory, settings.state_url, retention)


def rate_policy(settings: Settings) -> RatePolicy:
    """The server's limits, and a key file's own limits for the keys that set them."""
    default = RateLimits(settings.rate_limit_rpm, settings.rate_limit_tpm)
    per_owner: dict[str, RateLimits] = {}
    if settings.api_key_file is not None:
        for key, limits in read_key_limits(settings.api_key_file).items():
            if limits:
                per_owner[owner_of(key.encode("ascii"))] = RateLimits(
                    limits.get("rpm", default.requests_per_minute),
                    limits.get("tpm", default.tokens_per_minute),
                )
    return RatePolicy(default, per_owner)
