"""What rank 0 decided before a step, as plain data and as the bytes sent to the other ranks.

Only decisions that depend on something a follower cannot see are sent: a request joining the
batch (from rank 0's inbox and memory budget), one leaving it early (a client gone, a deadline,
shutdown) and prefix-cache eviction for room. Everything else (tokens, stop strings, finished
requests, cached prefixes) follows from the model's identical outputs on every rank.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from ..messages import SamplingParams


@dataclass(frozen=True)
class InsertOp:
    """A request joins the batch as generator row `uid`; the seed is fixed when sampling."""

    uid: int
    prompt_tokens: tuple[int, ...]
    params: SamplingParams
    need_bytes: int
    cached_tokens: int  # what rank 0 reused from its prefix cache: every rank must find the same


@dataclass(frozen=True)
class RemoveOp:
    uid: int


@dataclass(frozen=True)
class ShrinkOp:
    """Evict least recently used prefix-cache entries down to `max_bytes`."""

    max_bytes: int


Op = InsertOp | RemoveOp | ShrinkOp


@dataclass(frozen=True)
class StepPlan:
    ops: tuple[Op, ...] = ()
    live: int = 0  # rows in the batch once the ops are applied; a follower checks it agrees
    stop: bool = False


def encode_plan(plan: StepPlan) -> bytes:
    ops = [_encode_op(op) for op in plan.ops]
    return json.dumps([ops, plan.live, plan.stop], separators=(",", ":")).encode()


def decode_plan(data: bytes) -> StepPlan:
    ops, live, stop = json.loads(data)
    return StepPlan(tuple(_decode_op(op) for op in ops), int(live), bool(stop))


def _encode_op(op: Op) -> list[Any]:
    if isinstance(op, InsertOp):
        params = dataclasses.asdict(op.params)
        return ["insert", op.uid, op.prompt_tokens, params, op.need_bytes, op.cached_tokens]
    if isinstance(op, RemoveOp):
        return ["remove", op.uid]
    return ["shrink", op.max_bytes]


def _decode_op(fields: list[Any]) -> Op:
    kind, *values = fields
    if kind == "insert":
        uid, prompt, params, need_bytes, cached_tokens = values
        sampling = SamplingParams(**{name: _tuples(value) for name, value in params.items()})
        return InsertOp(uid, tuple(prompt), sampling, need_bytes, cached_tokens)
    if kind == "remove":
        return RemoveOp(values[0])
    if kind == "shrink":
        return ShrinkOp(values[0])
    raise ValueError(f"unknown step operation {kind!r}")


def _tuples(value: Any) -> Any:
    """JSON has lists where SamplingParams holds tuples (stop strings, logit bias pairs)."""
    if isinstance(value, list):
        return tuple(_tuples(item) for item in value)
    return value
