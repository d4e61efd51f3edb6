"""M-RoPE positions (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V) for rows of a shared batch.

These families number a prompt's image tokens by their place in the image (time, row, column),
so after an image the text positions run behind the token count by a per-prompt `rope delta`.
The prefill of a prompt with images uses the image's own three-axis positions; every later token
of that row sits at its cache offset plus the row's delta (0 for a prompt without images).

The delta rides with its row inside the row's cache list, as one more entry after the layers':
mlx-lm's BatchGenerator merges, extends, filters and extracts every entry of a row's cache as
rows join and leave the batch, and the prefix cache stores and trims it with the layers, so the
delta is always where the row is. (mlx-vlm's own batch generator keeps the same state, per-row
`rope_deltas`, beside its batch.)
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

MROPE_AXES = 3  # time, height, width


def is_mrope_language_model(language_model: Any) -> bool:
    """mlx-vlm's M-RoPE language models keep the last prompt's deltas on themselves."""
    return hasattr(language_model, "_rope_deltas") and hasattr(language_model, "get_rope_index")


class RowDeltas:
    """Each batch row's M-RoPE delta, as a cache entry that follows the row (see the module)."""

    def __init__(self, deltas: list[int] | None = None) -> None:
        self.deltas = deltas if deltas is not None else [0]

    # The single-sequence cache protocol (mlx-lm's KVCache) ...
    @property
    def state(self) -> list[Any]:
        return []

    @property
    def nbytes(self) -> int:
        return 0

    def size(self) -> int:
        return 0

    def is_trimmable(self) -> bool:
        return True  # a shorter prefix of the same prompt keeps the same delta

    def trim(self, count: int) -> int:
        return count

    def empty(self) -> bool:
        return False

    def merge(self, caches: list[RowDeltas]) -> RowDeltas:
        return RowDeltas([delta for cache in caches for delta in cache.deltas])

    # ... and the batch one (mlx-lm's BatchKVCache).
    def extend(self, other: RowDeltas) -> None:
        self.deltas = self.deltas + other.deltas

    def filter(self, keep: list[int]) -> None:
        self.deltas = [self.deltas[index] for index in keep]

    def extract(self, index: int) -> RowDeltas:
        return RowDeltas([self.deltas[index]])

    def prepare(self, **_: Any) -> None:
        return

    def finalize(self) -> None:
        return


def decode_positions(offset: int | mx.array, deltas: list[int], length: int) -> mx.array:
    """Three-axis positions [3, rows, length] of the next `length` tokens of each row: past
    the image, the three axes move together, from the row's offset plus its delta."""
    start = mx.maximum(offset, 0)[:, None] if isinstance(offset, mx.array) else mx.array(offset)
    rows = mx.array(deltas, dtype=mx.int32)[:, None] + start
    positions = rows + mx.arange(length, dtype=mx.int32)[None]
    return mx.broadcast_to(positions[None], (MROPE_AXES, *positions.shape))


def set_row_delta(cache: list[Any], delta: int) -> None:
    """The delta of the prompt now being prefilled into `cache` (one row's, possibly reused
    from the prefix cache: same images, so the same positions, but set anew all the same)."""
    rows: RowDeltas = cache[-1]
    rows.deltas = [delta]
