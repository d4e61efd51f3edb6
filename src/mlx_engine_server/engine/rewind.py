"""Per-row rewind of a batch KV cache after speculative verification.

Rows of mlx-lm's BatchKVCache (and our BatchQuantizedKVCache) are right-aligned at one shared
write index, the space before a row's first position being its left padding. After a step each
row forgets its rejected positions: the whole batch is trimmed by the fewest any row rejected,
and a row that rejected more is shifted right by the difference, the forgotten positions
becoming left padding. Left alone, that padding grows every step in which rows reject unevenly,
and the cache with it; the columns that are padding in every row are cut off after each shift
(what mlx-lm's own filter() does when a row leaves), so the cache stays as long as its longest
row.

Only the public surface of the caches is used: `trim`, `prepare`/`finalize` (mlx-lm's move of a
right-padded prefill into left padding) and the `state` property, read and set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import dynamic_roll

# A shift copies the rows it moves. When few rows move, gathering and writing back only those
# beats mlx-lm's roll of the whole batch (on this CPU, 1 row of 16: 15x less time; 8 of 16: even).
FEW_ROWS_SHARE = 0.25


def rewind_rows(layers: list[Any], rejected: list[int]) -> None:
    """Forget the last `rejected[i]` positions of row i in every layer's batch cache."""
    least = min(rejected)
    extra = [count - least for count in rejected]
    for layer in layers:
        if least:
            layer.trim(least)
        if any(extra):
            shift_rows_right(layer, extra)
    if any(extra) and layers:
        drop_common_left_padding(layers)


def shift_rows_right(layer: Any, extra: list[int]) -> None:
    """Row i's positions move `extra[i]` to the right; what they leave is left padding."""
    moving = [row for row, count in enumerate(extra) if count]
    if len(moving) > FEW_ROWS_SHARE * len(extra):
        layer.prepare(right_padding=extra)
        layer.finalize()
        return
    keys, values, offset, left_padding, used = layer.state
    rows = mx.array(moving)
    shifts = mx.array([extra[row] for row in moving])[:, None]

    def shift(x: mx.array) -> mx.array:
        x[rows, :, :used] = dynamic_roll(x[rows, :, :used], shifts, axis=2)
        return x

    added = mx.array(extra)
    layer.state = (
        _each(keys, shift),
        _each(values, shift),
        offset - added,
        left_padding + added,
        used,
    )


def drop_common_left_padding(layers: list[Any]) -> int:
    """Cut the columns that are left padding in every row; returns how many. Every layer of a
    batch has the same padding, so layer 0 says how much."""
    paddings: list[int] = layers[0].state[3].tolist()
    common = min(paddings)
    if common <= 0:
        return 0
    for layer in layers:
        keys, values, offset, left_padding, used = layer.state
        if keys is None:
            continue

        def cut(x: mx.array) -> mx.array:
            return x[..., common:, :]

        layer.state = (
            _each(keys, cut),
            _each(values, cut),
            offset,
            left_padding - common,
            used - common,
        )
    return common


def _each(kv: Any, function: Callable[[mx.array], mx.array]) -> Any:
    """Keys or values: one array, or a quantized (packed, scales, biases) triple."""
    if isinstance(kv, tuple):
        return tuple(function(part) for part in kv)
    return function(kv)
