"""Logprobs of the tokens a step generated, for the rows that asked: one batched gather per step.

mlx-lm's BatchGenerator hands every row its normalised logprobs (after logits processors: penalties,
logit_bias and grammar masks count, temperature does not). The rows that asked are stacked, their
top-k found with one argpartition, and all of it crosses to the host in one transfer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

from .messages import TokenLogprob, TopLogprob

# What OpenAI reports for a token whose probability underflows; JSON has no -Infinity.
FLOOR_LOGPROB = -9999.0


@dataclass(frozen=True)
class LogprobRequest:
    """One row's share of a step: its logprobs over the vocabulary, its token, how many top."""

    logprobs: mx.array
    token_id: int
    top: int


def gather_logprobs(
    rows: list[LogprobRequest], token_bytes: Callable[[int], bytes]
) -> list[TokenLogprob]:
    if not rows:
        return []
    stacked = mx.stack([row.logprobs for row in rows]).astype(mx.float32)
    chosen_ids = mx.array([row.token_id for row in rows])[:, None]
    chosen = mx.take_along_axis(stacked, chosen_ids, axis=-1)[:, 0]
    k = max(row.top for row in rows)
    top_ids = top_values = None
    if k > 0:
        top_ids = mx.argpartition(-stacked, kth=k - 1, axis=-1)[:, :k]
        top_values = mx.take_along_axis(stacked, top_ids, axis=-1)
        mx.eval(chosen, top_ids, top_values)
    chosen_list: list[float] = chosen.tolist()  # type: ignore[assignment]
    ids_list: list[list[int]] = top_ids.tolist() if top_ids is not None else []  # type: ignore[assignment]
    values_list: list[list[float]] = top_values.tolist() if top_values is not None else []  # type: ignore[assignment]
    return [
        TokenLogprob(
            token_id=row.token_id,
            token_bytes=token_bytes(row.token_id),
            logprob=_finite(chosen_list[index]),
            top=_top(ids_list, values_list, index, row.top, token_bytes),
        )
        for index, row in enumerate(rows)
    ]


def _top(
    ids: list[list[int]],
    values: list[list[float]],
    index: int,
    count: int,
    token_bytes: Callable[[int], bytes],
) -> tuple[TopLogprob, ...]:
    if count == 0:
        return ()
    pairs = sorted(zip(values[index], ids[index], strict=True), reverse=True)[:count]
    return tuple(
        TopLogprob(token_id=token_id, token_bytes=token_bytes(token_id), logprob=value)
        for value, token_id in pairs
        if math.isfinite(value)  # tokens a grammar or logit_bias ruled out
    )


def _finite(value: float) -> float:
    return value if math.isfinite(value) else FLOOR_LOGPROB
