"""Memory-aware admission: a request starts only when its KV cache and prefill fit the budget.

Per-token costs are measured once at start-up on the loaded model (a one-token forward pass),
so they hold for any architecture and dtype without a table of model families: caches that grow
(KVCache allocates `step` positions at a time) cost bytes per token, recurrent state a fixed
amount per request. Used only from the worker thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

# Prefill activations grow with the chunk processed at once; count them at this many times the
# one-token measurement per token, which leaves room for attention scores and temporaries.
PREFILL_SAFETY_FACTOR = 2


@dataclass(frozen=True)
class MemoryModel:
    budget_bytes: int
    weights_bytes: int
    kv_bytes_per_token: int
    fixed_bytes_per_request: int
    activation_bytes_per_token: int

    def request_bytes(self, prompt_tokens: int, max_tokens: int, prefill_step: int) -> int:
        kv = (prompt_tokens + max_tokens) * self.kv_bytes_per_token
        prefill = min(prompt_tokens, prefill_step) * self.activation_bytes_per_token
        return kv + self.fixed_bytes_per_request + prefill * PREFILL_SAFETY_FACTOR

    @property
    def room_bytes(self) -> int:
        """What requests and the prefix cache may use together."""
        return self.budget_bytes - self.weights_bytes


def measure_memory(model: Any, budget_bytes: int | None) -> MemoryModel:
    """Weights, KV bytes per token and activation bytes per token, from a one-token pass."""
    parameters: Any = tree_flatten(model.parameters())
    weights = sum(array.nbytes for _, array in parameters)
    cache = make_prompt_cache(model)
    mx.synchronize()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    logits = model(mx.array([[0]]), cache=cache)
    mx.eval(logits, [layer.state for layer in cache])
    activation = max(0, mx.get_peak_memory() - before - logits.nbytes)
    grows = [layer for layer in cache if hasattr(layer, "step")]
    fixed = [layer for layer in cache if not hasattr(layer, "step")]
    kv_per_token = sum(layer.nbytes / layer.step for layer in grows)
    fixed_bytes = sum(layer.nbytes for layer in fixed)
    del logits, cache
    mx.clear_cache()
    return MemoryModel(
        budget_bytes=budget_bytes if budget_bytes is not None else int(mx.get_memory_limit()),
        weights_bytes=int(weights),
        kv_bytes_per_token=max(1, math.ceil(kv_per_token)),
        fixed_bytes_per_request=int(fixed_bytes),
        activation_bytes_per_token=max(1, int(activation)),
    )


class MemoryLedger:
    """Bytes reserved by admitted requests, checked against the budget before each admission."""

    def __init__(self, model: MemoryModel) -> None:
        self.model = model
        self.reserved_bytes = 0

    def fits(self, need_bytes: int, cache_bytes: int) -> bool:
        return self.reserved_bytes + cache_bytes + need_bytes <= self.model.room_bytes

    def could_ever_fit(self, need_bytes: int) -> bool:
        return need_bytes <= self.model.room_bytes

    def reserve(self, need_bytes: int) -> None:
        self.reserved_bytes += need_bytes

    def release(self, need_bytes: int) -> None:
        self.reserved_bytes -= need_bytes
