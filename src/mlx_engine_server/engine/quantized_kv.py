"""A quantized KV cache inside the batch (--kv-bits): mlx-lm has QuantizedKVCache for one
sequence only, and its BatchGenerator batches KVCache rows alone.

BatchQuantizedKVCache is mlx-lm's BatchKVCache (left-padded rows, one shared write index,
per-row offsets for RoPE and the mask) holding keys and values as `mx.quantize` triples
(packed words, scales, biases); attention reads them through mlx-lm's quantized SDPA, which a
model picks for any cache with a `bits` attribute. A row leaves the batch as a
QuantizedRowCache (finished requests go to the prefix cache that way, at the smaller size),
and a row joins from one.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import KVCache, QuantizedKVCache, dynamic_roll

Triple = tuple[mx.array, mx.array, mx.array]  # packed values, scales, biases


class QuantizedRowCache(QuantizedKVCache):
    """One sequence's quantized cache, which batches as a BatchQuantizedKVCache."""

    keys: Any
    values: Any

    def size(self) -> int:
        return int(self.offset)

    @classmethod
    def merge(cls, caches: list[Any]) -> BatchQuantizedKVCache:
        return BatchQuantizedKVCache.merge(caches)

    def shared_prefix(self, length: int) -> QuantizedRowCache:
        """A new cache over the first `length` positions, sharing these arrays."""
        shared = QuantizedRowCache(self.group_size, self.bits)
        if self.keys is not None:
            shared.keys, shared.values = tree_map(
                lambda x: x[..., :length, :], (self.keys, self.values)
            )
        shared.offset = length
        return shared


def as_row_cache(layers: list[Any] | None, group_size: int, bits: int) -> list[Any]:
    """Every layer of a row's cache in quantized form (a fresh row: empty ones)."""
    if layers is None:
        return []
    rows = []
    for layer in layers:
        if isinstance(layer, QuantizedRowCache):
            rows.append(layer)
        elif isinstance(layer, KVCache):
            rows.append(_quantized_copy(layer, group_size, bits))
        else:
            raise TypeError(f"--kv-bits cannot quantize a {type(layer).__name__}")
    return rows


def empty_row_cache(num_layers: int, group_size: int, bits: int) -> list[Any]:
    return [QuantizedRowCache(group_size, bits) for _ in range(num_layers)]


def _quantized_copy(layer: KVCache, group_size: int, bits: int) -> QuantizedRowCache:
    row = QuantizedRowCache(group_size, bits)
    keys, values = layer.keys, layer.values
    if keys is not None and values is not None:
        length = layer.offset
        row.keys = mx.quantize(keys[..., :length, :], group_size=group_size, bits=bits)
        row.values = mx.quantize(values[..., :length, :], group_size=group_size, bits=bits)
        row.offset = length
    return row


class BatchQuantizedKVCache:
    """mlx-lm's BatchKVCache layout and bookkeeping, over quantized triples."""

    step = 256

    def __init__(self, left_padding: list[int], group_size: int, bits: int) -> None:
        self.keys: Triple | None = None
        self.values: Triple | None = None
        self.left_padding = mx.array(left_padding)
        self.offset = mx.array([-pad for pad in left_padding])
        self._idx = 0
        self._right_padding: mx.array | None = None
        self.group_size = group_size
        self.bits = bits

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Triple, Triple]:
        prev, count = self._idx, keys.shape[2]
        if self.keys is None or self.values is None or prev + count > self.keys[0].shape[2]:
            self._grow(keys, values, count)
        self.offset = self.offset + count
        self._idx += count
        new_keys = mx.quantize(keys, group_size=self.group_size, bits=self.bits)
        new_values = mx.quantize(values, group_size=self.group_size, bits=self.bits)
        keys_now, values_now = self._stored()
        for stored, new in zip((*keys_now, *values_now), (*new_keys, *new_values), strict=True):
            stored[..., prev : self._idx, :] = new
        return self.keys_and_values()

    def _grow(self, keys: mx.array, values: mx.array, count: int) -> None:
        batch, heads = keys.shape[:2]
        positions = (self.step + count - 1) // self.step * self.step
        per_word = 32 // self.bits

        def blank(dim: int) -> Triple:
            shape = (batch, heads, positions)
            return (
                mx.zeros((*shape, dim // per_word), dtype=mx.uint32),
                mx.zeros((*shape, dim // self.group_size), dtype=keys.dtype),
                mx.zeros((*shape, dim // self.group_size), dtype=keys.dtype),
            )

        more_keys, more_values = blank(keys.shape[3]), blank(values.shape[3])
        if self.keys is None or self.values is None:
            self.keys, self.values = more_keys, more_values
            return
        used = self._idx
        self.keys = _concat(_cut(self.keys, used), more_keys)
        self.values = _concat(_cut(self.values, used), more_values)

    def keys_and_values(self) -> tuple[Triple, Triple]:
        keys, values = self._stored()
        return _cut(keys, self._idx), _cut(values, self._idx)

    def _stored(self) -> tuple[Triple, Triple]:
        if self.keys is None or self.values is None:
            raise ValueError("the quantized cache holds nothing yet")
        return self.keys, self.values

    def prepare(
        self,
        *,
        left_padding: list[int] | None = None,
        lengths: list[int] | None = None,
        right_padding: list[int] | None = None,
    ) -> None:
        if left_padding is not None:
            if self.keys is not None:
                raise ValueError("left padding can only be added to an empty cache")
            added = mx.array(left_padding)
            self.left_padding += added
            self.offset = self.offset - added
        if right_padding is not None and max(right_padding) > 0:
            self._right_padding = mx.array(right_padding)

    def finalize(self) -> None:
        """Right padding (a right-padded prefill, or rejected drafts) becomes left padding."""
        padding = self._right_padding
        if padding is None or self.keys is None or self.values is None:
            return
        shift = padding[:, None]
        self.keys = _map(self.keys, lambda x: dynamic_roll(x, shift, axis=2))
        self.values = _map(self.values, lambda x: dynamic_roll(x, shift, axis=2))
        self.offset = self.offset - padding
        self.left_padding += padding
        self._right_padding = None

    @property
    def state(self) -> tuple[Any, ...]:
        """As BatchKVCache's: keys, values, offset, left padding, write index."""
        return self.keys, self.values, self.offset, self.left_padding, self._idx

    @state.setter
    def state(self, value: tuple[Any, ...]) -> None:
        self.keys, self.values, self.offset, self.left_padding, self._idx = value

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self._idx, n)
        self._idx -= n
        self.offset = self.offset - n
        return n

    def make_mask(self, N: int, return_array: bool = False, **kwargs: Any) -> mx.array:
        mask: mx.array = create_causal_mask(
            N, offset=self._idx, left_padding=self.left_padding, **kwargs
        )
        return mask

    def filter(self, batch_indices: list[int] | mx.array) -> None:
        if self.keys is not None and self.values is not None:
            self.keys = _map(self.keys, lambda x: x[batch_indices])
            self.values = _map(self.values, lambda x: x[batch_indices])
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        paddings: list[int] = self.left_padding.tolist()  # type: ignore[assignment]
        least = min(paddings)
        if least > 0:
            if self.keys is not None and self.values is not None:
                self.keys = _map(self.keys, lambda x: x[..., least:, :])
                self.values = _map(self.values, lambda x: x[..., least:, :])
            self._idx -= least
            self.left_padding -= least

    def extend(self, other: BatchQuantizedKVCache) -> None:
        """Rows of `other` after these, both right-aligned at the larger write index."""
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        width = max(self._idx, other._idx)
        template = self if self.keys is not None else other
        mine, theirs = self._aligned(width, template), other._aligned(width, template)
        self.keys = _concat(mine[0], theirs[0], axis=0)
        self.values = _concat(mine[1], theirs[1], axis=0)
        self.offset = mx.concatenate([self.offset, other.offset])
        self.left_padding = mx.concatenate([mine[2], theirs[2]])
        self._idx = width

    def _aligned(
        self, width: int, template: BatchQuantizedKVCache
    ) -> tuple[Triple, Triple, mx.array]:
        """Keys, values and left padding with `width - _idx` more positions on the left; rows
        with nothing stored yet are all padding, shaped like `template`'s."""
        left = width - self._idx
        rows = self.offset.shape[0]

        def pad(x: mx.array) -> mx.array:
            x = x[..., : self._idx, :]
            return mx.pad(x, [(0, 0), (0, 0), (left, 0), (0, 0)]) if left else x

        def blank(x: mx.array) -> mx.array:
            return mx.zeros((rows, x.shape[1], width, x.shape[3]), dtype=x.dtype)

        if self.keys is None or self.values is None:
            template_keys, template_values = template._stored()
            keys, values = _map(template_keys, blank), _map(template_values, blank)
            return keys, values, self.left_padding + width
        return _map(self.keys, pad), _map(self.values, pad), self.left_padding + left

    def extract(self, idx: int) -> QuantizedRowCache:
        row = QuantizedRowCache(self.group_size, self.bits)
        padding: int = self.left_padding.tolist()[idx]  # type: ignore[index,assignment]
        if self.keys is not None and self.values is not None:
            row.keys = _map(
                self.keys, lambda x: mx.contiguous(x[idx : idx + 1, :, padding : self._idx])
            )
            row.values = _map(
                self.values, lambda x: mx.contiguous(x[idx : idx + 1, :, padding : self._idx])
            )
            row.offset = self._idx - padding
        return row

    @classmethod
    def merge(cls, caches: list[Any]) -> BatchQuantizedKVCache:
        first = caches[0]
        group_size, bits = first.group_size, first.bits
        lengths = [cache.size() for cache in caches]
        longest = max(lengths)
        batch = cls([longest - length for length in lengths], group_size, bits)
        filled = [(i, c) for i, c in enumerate(caches) if c.keys is not None and c.offset > 0]
        if not filled:
            return batch
        batch.keys = _stack_left_padded(
            [c.keys for _, c in filled], [i for i, _ in filled], lengths, longest
        )
        batch.values = _stack_left_padded(
            [c.values for _, c in filled], [i for i, _ in filled], lengths, longest
        )
        batch.offset += longest
        batch._idx = longest
        return batch

    def size(self) -> int:
        return self._idx

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        if self.keys is None or self.values is None:
            return 0
        return sum(x.nbytes for x in (*self.keys, *self.values))


def _stack_left_padded(
    triples: list[Triple], rows: list[int], lengths: list[int], longest: int
) -> Triple:
    """One (B, H, longest, ...) triple, row i's positions at the right end."""
    batch = len(lengths)
    parts = []
    for component in range(3):
        sample = triples[0][component]
        merged = mx.zeros((batch, sample.shape[1], longest, sample.shape[3]), dtype=sample.dtype)
        for row, triple in zip(rows, triples, strict=True):
            length = lengths[row]
            merged[row : row + 1, :, longest - length :] = triple[component][..., :length, :]
        parts.append(merged)
    return parts[0], parts[1], parts[2]


def _cut(triple: Triple, length: int) -> Triple:
    return _map(triple, lambda x: x[..., :length, :])


def _concat(first: Triple, second: Triple, axis: int = 2) -> Triple:
    a, b, c = (mx.concatenate([x, y], axis=axis) for x, y in zip(first, second, strict=True))
    return a, b, c


def _map(triple: Triple, function: Any) -> Triple:
    return function(triple[0]), function(triple[1]), function(triple[2])
