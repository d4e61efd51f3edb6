"""Prefix KV cache: finished requests' caches, found again by the longest shared token prefix.

Multi-turn chats and agents resend the same history; reusing its KV cache skips that prefill.
Entries live in an LRU bounded in bytes, enforced on every insert. A hit shares the stored arrays
instead of deep-copying them: MLX arrays are values, and each hit gets fresh cache objects whose
first write allocates new arrays, so a stored entry is never changed by the request that reuses it.
Caches that cannot be trimmed (recurrent layers) are reused only when a stored prompt is an exact
prefix of the new one. Used only from the worker thread.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from mlx_lm.models.cache import KVCache, PromptTrie, can_trim_prompt_cache

TRIE_KEY = "model"


@dataclass(frozen=True)
class CacheHit:
    """Reusable cache for the first `cached_tokens` tokens of a prompt (None: nothing to reuse)."""

    cache: list[Any] | None
    cached_tokens: int


MISS = CacheHit(cache=None, cached_tokens=0)


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
        self._trie = PromptTrie()
        self._entries: OrderedDict[tuple[int, ...], tuple[list[Any], int]] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._cached_tokens_total = 0

    def lookup(self, prompt: list[int]) -> CacheHit:
        """The longest stored prefix of `prompt`, leaving at least one token to process."""
        hit = self._find(prompt) if self.max_bytes > 0 and len(prompt) > 1 else MISS
        if hit.cached_tokens:
            self._hits += 1
            self._cached_tokens_total += hit.cached_tokens
        else:
            self._misses += 1
        return hit

    def store(self, tokens: list[int], cache: list[Any]) -> None:
        size = sum(layer.nbytes for layer in cache)
        if not tokens or size > self.max_bytes:
            return
        key = tuple(tokens)
        if key in self._entries:
            self._drop(key)
        self._trie.add(TRIE_KEY, tokens, key)
        if can_trim_prompt_cache(cache):
            self._drop_prefixes_of(tokens)  # a longer trimmable entry serves every prefix
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

    def _find(self, prompt: list[int]) -> CacheHit:
        result = self._trie.search(TRIE_KEY, prompt)
        if result.exact is not None:
            return self._reuse(tuple(result.exact), len(prompt) - 1)
        shorter = len(result.shorter) if result.shorter is not None else 0
        if result.longer is not None and result.common_prefix > shorter:
            longer = tuple(result.longer)
            if can_trim_prompt_cache(self._entries[longer][0]):
                return self._reuse(longer, min(result.common_prefix, len(prompt) - 1))
        if shorter:
            return self._reuse(tuple(result.shorter or ()), shorter)
        return MISS

    def _reuse(self, key: tuple[int, ...], length: int) -> CacheHit:
        cache, _ = self._entries[key]
        self._entries.move_to_end(key)
        if length < len(key) and not can_trim_prompt_cache(cache):
            return MISS
        return CacheHit(
            cache=[_share_prefix(layer, length) for layer in cache], cached_tokens=length
        )

    def _drop(self, key: tuple[int, ...]) -> None:
        _, size = self._entries.pop(key)
        self._trie.pop(TRIE_KEY, list(key))
        self._bytes -= size

    def _drop_prefixes_of(self, tokens: list[int]) -> None:
        for _, prefix in self._trie.pop_prefixes(TRIE_KEY, tokens):
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
