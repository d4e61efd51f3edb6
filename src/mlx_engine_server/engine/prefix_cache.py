"""Prefix KV cache: finished requests' caches, found again by the longest shared token prefix.

Multi-turn chats and agents resend the same history; reusing its KV cache skips that prefill.
Entries live in an LRU bounded in bytes, enforced on every insert. A hit shares the stored arrays
instead of deep-copying them: MLX arrays are values, and each hit gets fresh cache objects whose
first write allocates new arrays, so a stored entry is never changed by the request that reuses it.
Caches that cannot be trimmed (recurrent layers) are reused only when a stored prompt is an exact
prefix of the new one. Prompts with images live in a partition named by the digest of their
images: equal tokens (image placeholders look alike) with other images never match. Used only from
the worker thread.

Lookups walk our own token trie once, in time linear in the prompt: mlx-lm's PromptTrie searches
the whole subtree below a divergence point with list copies, which took milliseconds per lookup
with a few dozen stored conversations, on the worker thread, under the GIL the HTTP side needs.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from mlx_lm.models.cache import KVCache, can_trim_prompt_cache

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


class _Node:
    __slots__ = ("below", "children", "entry")

    def __init__(self) -> None:
        self.children: dict[int, _Node] = {}
        self.entry: EntryKey | None = None  # a stored prompt ends here
        self.below = 0  # stored prompts that end here or deeper


@dataclass(frozen=True)
class _Walk:
    """How far a prompt follows the trie: the deepest stored prompt on its path, and one stored
    prompt that goes at least as far as the walk did."""

    depth: int
    prefix: EntryKey | None
    deepest_entry: EntryKey | None


class _TokenTrie:
    def __init__(self) -> None:
        self._root = _Node()

    def add(self, tokens: list[int], key: EntryKey) -> None:
        node = self._root
        node.below += 1
        for token in tokens:
            node = node.children.setdefault(token, _Node())
            node.below += 1
        node.entry = key

    def remove(self, tokens: list[int]) -> None:
        path = [self._root]
        for token in tokens:
            path.append(path[-1].children[token])
        path[-1].entry = None
        for depth, node in enumerate(path):
            node.below -= 1
            if node.below == 0 and depth > 0:
                del path[depth - 1].children[tokens[depth - 1]]
                return

    @property
    def empty(self) -> bool:
        return self._root.below == 0

    def walk(self, tokens: list[int]) -> _Walk:
        node, depth, prefix = self._root, 0, None
        for token in tokens:
            child = node.children.get(token)
            if child is None:
                break
            node, depth = child, depth + 1
            if node.entry is not None:
                prefix = node.entry
        return _Walk(depth, prefix, _any_entry_below(node) if depth else None)

    def prefixes(self, tokens: list[int]) -> list[EntryKey]:
        """Stored prompts that are proper prefixes of `tokens`."""
        found, node = [], self._root
        for token in tokens[:-1]:
            next_node = node.children.get(token)
            if next_node is None:
                break
            node = next_node
            if node.entry is not None:
                found.append(node.entry)
        return found


def _any_entry_below(node: _Node) -> EntryKey | None:
    """Every node with prompts below it leads to one by any child that has some."""
    while node.entry is None:
        if not node.children:
            return None
        node = next(iter(node.children.values()))
    return node.entry


class PrefixCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._tries: dict[str, _TokenTrie] = {}  # one per partition, gone when it empties
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
        self._tries.setdefault(partition, _TokenTrie()).add(tokens, key)
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
        trie = self._tries.get(partition)
        if trie is None:
            return MISS
        walk = trie.walk(prompt)
        if walk.prefix is not None and len(walk.prefix[1]) == len(prompt):
            return self._reuse(walk.prefix, len(prompt) - 1)  # the same prompt again
        shorter = len(walk.prefix[1]) if walk.prefix is not None else 0
        longer = walk.deepest_entry
        if (
            longer is not None
            and walk.depth > shorter
            and can_trim_prompt_cache(self._entries[longer][0])
        ):
            return self._reuse(longer, min(walk.depth, len(prompt) - 1))
        if walk.prefix is not None:
            return self._reuse(walk.prefix, shorter)
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
        trie = self._tries[partition]
        trie.remove(list(key[1]))
        self._bytes -= size
        if trie.empty:
            del self._tries[partition]

    def _drop_prefixes_of(self, partition: str, tokens: list[int]) -> None:
        for prefix in self._tries[partition].prefixes(tokens):
            self._drop(prefix)


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
