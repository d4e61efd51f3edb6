"""Memory-aware admission: a request starts only when its KV cache and prefill fit the budget.

Per-token costs are measured once at start-up on the loaded model (a one-token forward pass),
so they hold for any architecture and dtype without a table of model families: caches that grow
(KVCache allocates `step` positions at a time) cost bytes per token, recurrent state a fixed
amount per request. A draft model (--draft-model) is measured the same way and added: its
weights once, its KV cache to every request's. Used only from the worker thread.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

# Prefill activations grow with the tokens processed at once; count them at this many times the
# measured slope, which leaves room for attention scores that grow with the context.
PREFILL_SAFETY_FACTOR = 2
PROBE_TOKENS = 9


@dataclass(frozen=True)
class MemoryModel:
    budget_bytes: int
    weights_bytes: int
    kv_bytes_per_token: int
    fixed_bytes_per_request: int
    activation_bytes_per_token: int
    prefill_workspace_bytes: int
    draft_weights_bytes: int = 0  # of weights_bytes: a draft model's (--draft-model)
    draft_kv_bytes_per_token: int = 0  # of kv_bytes_per_token: its cache, row for row

    def request_bytes(self, prompt_tokens: int, max_tokens: int) -> int:
        """A running request holds its KV cache (and recurrent state) until it ends."""
        kv = (prompt_tokens + max_tokens) * self.kv_bytes_per_token
        return kv + self.fixed_bytes_per_request

    @property
    def room_bytes(self) -> int:
        """What running requests and the prefix cache may hold together.

        Prefill activations are transient and bounded by the tokens prefilled at once, so they
        are set aside once as a workspace rather than charged to every request.
        """
        return self.budget_bytes - self.weights_bytes - self.prefill_workspace_bytes


def measure_memory(
    model: Any,
    budget_bytes: int | None,
    prefill_tokens: int,
    make_cache: Callable[[Any], list[Any]] = make_prompt_cache,
) -> MemoryModel:
    """Weights, KV bytes per token and activation bytes per token, from two short passes.

    A forward pass has a fixed cost (temporaries the size of a weight matrix, the logits) and a
    cost that grows with the tokens processed at once; the slope between a one-token and a
    PROBE_TOKENS-token pass is the latter, the one-token peak counts once beside the weights.
    """
    parameters: Any = tree_flatten(model.parameters())
    weights = sum(array.nbytes for _, array in parameters)
    one_token_peak, cache = _forward_peak(model, 1, make_cache)
    probe_peak, _ = _forward_peak(model, PROBE_TOKENS, make_cache)
    grows = [layer for layer in cache if hasattr(layer, "step")]
    fixed = [layer for layer in cache if not hasattr(layer, "step")]
    kv_per_token = sum(layer.nbytes / layer.step for layer in grows)
    activation = max(1, (probe_peak - one_token_peak) // (PROBE_TOKENS - 1))
    del cache
    mx.clear_cache()
    return MemoryModel(
        budget_bytes=budget_bytes if budget_bytes is not None else int(mx.get_memory_limit()),
        weights_bytes=int(weights) + one_token_peak,
        kv_bytes_per_token=max(1, math.ceil(kv_per_token)),
        fixed_bytes_per_request=int(sum(layer.nbytes for layer in fixed)),
        activation_bytes_per_token=activation,
        prefill_workspace_bytes=prefill_tokens * activation * PREFILL_SAFETY_FACTOR,
    )


def with_draft_model(memory: MemoryModel, draft_model: Any) -> MemoryModel:
    """A draft model's weights (and its one-token pass) sit beside the main model's, and each
    running row keeps a draft KV cache as long as its main one; both measured the same way.
    The draft's prefill of a joining row is smaller than the main model's, whose workspace is
    already set aside."""
    draft = measure_memory(draft_model, memory.budget_bytes, 0)
    return replace(
        memory,
        weights_bytes=memory.weights_bytes + draft.weights_bytes,
        kv_bytes_per_token=memory.kv_bytes_per_token + draft.kv_bytes_per_token,
        fixed_bytes_per_request=memory.fixed_bytes_per_request + draft.fixed_bytes_per_request,
        draft_weights_bytes=draft.weights_bytes,
        draft_kv_bytes_per_token=draft.kv_bytes_per_token,
    )


def _forward_peak(
    model: Any, tokens: int, make_cache: Callable[[Any], list[Any]]
) -> tuple[int, list[Any]]:
    """Peak bytes above what was in use, for one forward pass over `tokens` tokens."""
    cache = make_cache(model)
    mx.synchronize()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    logits = model(mx.zeros((1, tokens), dtype=mx.int32), cache=cache)
    mx.eval(logits, [layer.state for layer in cache])
    peak = max(0, int(mx.get_peak_memory() - before))
    del logits
    return peak, cache


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
