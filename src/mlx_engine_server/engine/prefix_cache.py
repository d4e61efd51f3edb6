"""Prefix KV cache: finished requests' caches, found again by the longest shared token prefix.

Multi-turn chats and agents resend the same history; reusing its KV cache skips that prefill.
Entries live in an LRU bounded in bytes, enforced on every insert. A hit shares the stored arrays
instead of deep-copying them: MLX arrays are values, and each hit gets fresh cache objects whose
first write allocates new arrays, so a stored entry is never changed by the request that reuses it.
Caches that cannot be trimmed (recurrent layers, a wrapped sliding window) are reused only when a
stored prompt is an exact prefix of the new one; the worker stores those at the end of each prompt
too, the boundary the next turn starts from. Prompts with images live in a partition named by the
digest of their images: equal tokens (image placeholders look alike) with other images never
match. Used only from the worker thread.

Lookups walk our own radix trie once, comparing runs of tokens at C speed: mlx-lm's PromptTrie (a
node per token) searches the whole subtree below a divergence point with list copies, which took
milliseconds per lookup with a few dozen stored conversations, on the worker thread, under the GIL
the HTTP side needs; and storing a long prompt built thousands of nodes.
"""

from __future__ import annotations

import copy
import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from mlx_lm.models.cache import KVCache, can_trim_prompt_cache

from .messages import PrefixCacheStats
from .quantized_kv import QuantizedRowCache

TEXT_PARTITION = "text"  # prompts without images; others use their images' digest


@dataclass(frozen=True)
class CacheHit:
    """Reusable cache for the first `cached_tokens` tokens of a prompt (None: nothing to reuse)."""

    cache: list[Any] | None
    cached_tokens: int


MISS = CacheHit(cache=None, cached_tokens=0)
EntryKey = tuple[str, tuple[int, ...]]  # (partition, tokens)
COMPARE_BLOCK = 64


class _Node:
    __slots__ = ("below", "children", "entry", "label")

    def __init__(self, label: tuple[int, ...]) -> None:
        self.label = label  # the tokens on the edge into this node
        self.children: dict[int, _Node] = {}  # by the first token of their label
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
    """A radix trie: an edge holds a run of tokens; a prompt costs nodes only where it branches."""

    def __init__(self) -> None:
        self._root = _Node(())

    def add(self, tokens: tuple[int, ...], key: EntryKey) -> None:
        node, depth = self._root, 0
        node.below += 1
        while depth < len(tokens):
            child = node.children.get(tokens[depth])
            if child is None:
                child = node.children[tokens[depth]] = _Node(tokens[depth:])
            shared = _shared_length(child.label, tokens, depth)
            if shared < len(child.label):
                child = _split(node, child, shared)
            child.below += 1
            node, depth = child, depth + shared
        node.entry = key

    def remove(self, tokens: tuple[int, ...]) -> None:
        path, depth = [self._root], 0
        while depth < len(tokens):
            path.append(path[-1].children[tokens[depth]])
            depth += len(path[-1].label)
        path[-1].entry = None
        self._root.below -= 1
        for parent, node in itertools.pairwise(path):
            node.below -= 1
            if node.below == 0:
                del parent.children[node.label[0]]
                return

    @property
    def empty(self) -> bool:
        return self._root.below == 0

    def walk(self, tokens: tuple[int, ...]) -> _Walk:
        node, depth, prefix = self._root, 0, None
        while depth < len(tokens):
            child = node.children.get(tokens[depth])
            if child is None:
                break
            shared = _shared_length(child.label, tokens, depth)
            node, depth = child, depth + shared  # what is stored below goes through `depth`
            if shared < len(child.label):
                break
            if node.entry is not None:
                prefix = node.entry
        return _Walk(depth, prefix, _any_entry_below(node) if depth else None)

    def prefixes(self, tokens: tuple[int, ...]) -> list[EntryKey]:
        """Stored prompts that are proper prefixes of `tokens`."""
        found, node, depth = [], self._root, 0
        while depth < len(tokens):
            child = node.children.get(tokens[depth])
            if child is None or _shared_length(child.label, tokens, depth) < len(child.label):
                break
            node, depth = child, depth + len(child.label)
            if node.entry is not None and depth < len(tokens):
                found.append(node.entry)
        return found


def _split(parent: _Node, child: _Node, at: int) -> _Node:
    """Cut `child`'s edge after `at` tokens; the new node in between is returned."""
    upper = _Node(child.label[:at])
    upper.below = child.below
    child.label = child.label[at:]
    upper.children[child.label[0]] = child
    parent.children[upper.label[0]] = upper
    return upper


def _shared_length(label: tuple[int, ...], tokens: tuple[int, ...], start: int) -> int:
    """How many leading tokens of `label` `tokens[start:]` repeats: compared a block at a time."""
    end = min(len(label), len(tokens) - start)
    shared = 0
    while shared < end:
        step = min(COMPARE_BLOCK, end - shared)
        if label[shared : shared + step] != tokens[start + shared : start + shared + step]:
            break
        shared += step
    while shared < end and label[shared] == tokens[start + shared]:
        shared += 1
    return shared


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
        self._tries.setdefault(partition, _TokenTrie()).add(key[1], key)
        if can_trim_prompt_cache(cache):
            self._drop_prefixes_of(partition, key[1])  # a longer trimmable entry serves prefixes
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
        walk = trie.walk(tuple(prompt))
        if walk.prefix is not None and len(walk.prefix[1]) == len(prompt):
            hit = self._reuse(walk.prefix, len(prompt) - 1)  # the same prompt again
            return hit if hit.cached_tokens else self._longest_proper_prefix(trie, prompt)
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

    def _longest_proper_prefix(self, trie: _TokenTrie, prompt: list[int]) -> CacheHit:
        """For a prompt stored whole whose cache cannot be cut back by its last token: the
        longest shorter stored prompt it starts with, at its own length (a regenerated answer
        of a recurrent model starts from the conversation's previous turn)."""
        shorter = trie.prefixes(tuple(prompt))
        return self._reuse(shorter[-1], len(shorter[-1][1])) if shorter else MISS

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
        trie.remove(key[1])
        self._bytes -= size
        if trie.empty:
            del self._tries[partition]

    def _drop_prefixes_of(self, partition: str, tokens: tuple[int, ...]) -> None:
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
    if isinstance(layer, QuantizedRowCache):
        return layer.shared_prefix(length)
    clone = copy.deepcopy(layer)  # other cache kinds: rare, so correctness over speed
    if clone.size() > length:
        clone.trim(clone.size() - length)
    return clone
