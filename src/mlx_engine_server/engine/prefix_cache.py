"""Prefix KV cache: finished requests' caches, found again by the longest shared token prefix.

Multi-turn chats and agents resend the same history; reusing its KV cache skips that prefill.
Entries live in an LRU bounded in bytes, enforced on every insert. A hit shares the stored arrays
instead of deep-copying them: MLX arrays are values, and each hit gets fresh cache objects whose
first write allocates new arrays, so a stored entry is never changed by the request that reuses it.
Caches that cannot be trimmed (recurrent layers) are reused only when a stored prompt is an exact
prefix of the new one. Prompts with images live in a partition named by the digest of their
images: equal tokens (image placeholders look alike) with other images never match. Used only from
the worker thread.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from mlx_lm.models.cache import KVCache, PromptTrie, can_trim_prompt_cache

TEXT_PARTITION = "text"  # prompts without images; others use their images' digest


@dataclass(frozen=True)
class CacheHit:
    """Reusable cache for the first `cached_tokens` tokens of a prompt (None: nothing to reuse)."""

    cache: list[Any] | None
    cached_tokens: int


MISS = CacheHit(cache=None, cached_tokens=0)
EntryKey = tuple[str, tuple[int, ...]]  # (partition, tokens)


@dataclass(frozen=True)
class PrefixCacheStats:
    entries: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int
    cached_tokens_total: int


class PrefixCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._tries: dict[str, PromptTrie] = {}  # one per partition, gone when it empties
        self._entries: OrderedDict[EntryKey, tuple[list[Any], int]] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._cached_tokens_total = 0

    def lookup(self, prompt: list[int], partition: str = TEXT_PARTITION) -> CacheHit:
        """The longest stored prefix of `prompt`, leaving at least one token to process."""
        hit = self._find(partition, prompt) if self.max_bytes > 0 and len(prompt) > 1 else MISS
        if hit.cached_tokens:
            self._hits += 1
            self._cached_tokens_total += hit.cached_tokens
        else:
            self._misses += 1
        return hit

    def store(self, tokens: list[int], cache: list[Any], partition: str = TEXT_PARTITION) -> None:
        size = sum(layer.nbytes for layer in cache)
        if not tokens or size > self.max_bytes:
            return
        key = (partition, tuple(tokens))
        if key in self._entries:
            self._drop(key)
        self._tries.setdefault(partition, PromptTrie()).add(partition, tokens, key)
        if can_trim_prompt_cache(cache):
            self._drop_prefixes_of(partition, tokens)  # a longer trimmable entry serves prefixes
        self._entries[key] = (cache, size)
        self._bytes += size
        while self._bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    @property
    def bytes(self) -> int:
        return self._bytes

    def shrink_to(self, max_bytes: int) -> None:
        """Evict least recently used entries until at most `max_bytes` are held."""
        while self._entries and self._bytes > max_bytes:
            self._drop(next(iter(self._entries)))

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(
            entries=len(self._entries),
            bytes=self._bytes,
            max_bytes=self.max_bytes,
            hits=self._hits,
            misses=self._misses,
            cached_tokens_total=self._cached_tokens_total,
        )

    def _find(self, partition: str, prompt: list[int]) -> CacheHit:
        if partition not in self._tries:
            return MISS
        result = self._tries[partition].search(partition, prompt)
        if result.exact is not None:
            return self._reuse((partition, tuple(result.exact)), len(prompt) - 1)
        shorter = len(result.shorter) if result.shorter is not None else 0
        if result.longer is not None and result.common_prefix > shorter:
            longer = (partition, tuple(result.longer))
            if can_trim_prompt_cache(self._entries[longer][0]):
                return self._reuse(longer, min(result.common_prefix, len(prompt) - 1))
        if shorter:
            return self._reuse((partition, tuple(result.shorter or ())), shorter)
        return MISS

    def _reuse(self, key: EntryKey, length: int) -> CacheHit:
        cache, _ = self._entries[key]
        self._entries.move_to_end(key)
        if length < len(key[1]) and not can_trim_prompt_cache(cache):
            return MISS
        return CacheHit(
            cache=[_share_prefix(layer, length) for layer in cache], cached_tokens=length
        )

    def _drop(self, key: EntryKey) -> None:
        _, size = self._entries.pop(key)
        partition = key[0]
        self._tries[partition].pop(partition, list(key[1]))
        self._bytes -= size
        if not any(entry[0] == partition for entry in self._entries):
            del self._tries[partition]

    def _drop_prefixes_of(self, partition: str, tokens: list[int]) -> None:
        for _, prefix in self._tries[partition].pop_prefixes(partition, tokens):
            _, size = self._entries.pop(prefix)
            self._bytes -= size


def _share_prefix(layer: Any, length: int) -> Any:
    """A fresh cache object over the first `length` positions of `layer`, sharing its arrays."""
    if type(layer) is KVCache and layer.keys is not None and layer.values is not None:
        shared = KVCache()
        shared.keys = layer.keys[..., :length, :]
        shared.values = layer.values[..., :length, :]
        shared.offset = length
        return shared
    clone = copy.deepcopy(layer)  # other cache kinds: rare, so correctness over speed
    if clone.size() > length:
        clone.trim(clone.size() - length)
    return clone
