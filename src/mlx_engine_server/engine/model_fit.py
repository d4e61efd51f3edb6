"""Which engine options a model's layers can take, decided at start-up, before any request.

Speculative decoding rewinds rejected rows and `--kv-bits` quantizes them: both need every layer
to hold a plain KV cache, which can be cut back and quantized. A sliding window (RotatingKVCache)
or a recurrent state (ArraysCache, and CacheList holding one) cannot, so those options are
refused by name for such a model. An attention that reads keys and values itself instead of
through mlx-lm's attention helper (DeepSeek's latent attention) cannot read a quantized cache:
its failure on the first quantized pass is turned into the same kind of refusal.

A cache kind mlx-lm cannot batch at all (Llama 4's chunked attention) is refused. Batching
itself is probed for models with recurrent layers: where mlx-lm's layers of a family
ignore the lengths of right-padded rows, prompts are prefilled one at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import ArraysCache, make_prompt_cache

from ..errors import StartupError
from .messages import EngineOptions

logger = logging.getLogger(__name__)
T = TypeVar("T")


def layer_cache_kinds(model: Any) -> set[str]:
    """The class names of the caches mlx-lm makes for `model`'s layers."""
    return {type(layer).__name__ for layer in make_prompt_cache(model)}


def family_name(model: Any) -> str:
    """mlx-lm's `model_type` of the model (its module's name where it keeps no args)."""
    model_type = getattr(getattr(model, "args", None), "model_type", None)
    return str(model_type or type(model).__module__.rsplit(".", 1)[-1])


def _nested_layer_caches(model: Any) -> list[Any]:
    layers = make_prompt_cache(model)
    return [inner for layer in layers for inner in getattr(layer, "caches", (layer,))]


def check_batchable(model: Any) -> None:
    """mlx-lm's BatchGenerator merges the rows' caches layer by layer; a cache kind it cannot
    merge (Llama 4's ChunkedKVCache) would fail every request, so the model is refused."""
    layers = _nested_layer_caches(model)
    unbatchable = sorted({type(layer).__name__ for layer in layers if not hasattr(layer, "merge")})
    if unbatchable:
        raise StartupError(
            f"this {family_name(model)!r} model keeps {', '.join(unbatchable)} layers, which "
            "mlx-lm's BatchGenerator cannot batch (it has no merge for them); this server runs "
            "every request in that batch, so it cannot serve this model"
        )


def check_plain_kv_cache(model: Any, option: str) -> None:
    """`option` is refused, by name, for a model with a layer cache other than KVCache."""
    kinds = layer_cache_kinds(model)
    if kinds - {"KVCache"}:
        raise StartupError(
            f"{option} needs a model whose every layer has a plain KV cache; this "
            f"{family_name(model)!r} model has {', '.join(sorted(kinds))} (a sliding window or a "
            f"recurrent state cannot be rewound or quantized): start without {option}"
        )


def check_options_fit(model: Any, options: EngineOptions, draft_model: Any = None) -> None:
    if options.speculative != "none":
        check_plain_kv_cache(model, f"--speculative {options.speculative}")
    if options.kv_bits is not None:
        check_plain_kv_cache(model, f"--kv-bits {options.kv_bits}")
    if draft_model is not None:
        check_plain_kv_cache(draft_model, "--draft-model")


def first_quantized_pass(model: Any, options: EngineOptions, run: Callable[[], T]) -> T:
    """`run()`, the first forward passes over the row cache; under --kv-bits a failure there
    means the model's attention cannot read a quantized cache."""
    if options.kv_bits is None:
        return run()
    try:
        return run()
    except (AttributeError, TypeError, ValueError) as exc:
        raise StartupError(
            f"--kv-bits {options.kv_bits} (group size {options.kv_group_size}) does not fit this "
            f"{family_name(model)!r} model: its first pass over a quantized KV cache failed "
            f"({type(exc).__name__}: {exc}); start without --kv-bits, or with another "
            "--kv-group-size if the message names one"
        ) from None


# Rows of 16 and 2 tokens: the short one is right-padded by 14 in a batched prefill.
PROBE_ROWS = (tuple(range(1, 17)), (5, 9))
PROBE_TOP_TOKENS = 16
PROBE_TOLERANCE = {mx.float32: 1e-3}
PROBE_TOLERANCE_16_BIT = 0.5  # bf16 logits of ~20 are 0.125 apart; a padding fault moves more


# Caches that can always be cut back to a shorter prefix (RowDeltas: a vision row's M-RoPE shift).
CUTTABLE_CACHES = {"KVCache", "RowDeltas"}


def has_uncuttable_layers(model: Any) -> bool:
    """Does a layer keep something a prefix cache cannot cut back (a sliding window that may
    wrap, a recurrent state)?"""
    return any(type(layer).__name__ not in CUTTABLE_CACHES for layer in _nested_layer_caches(model))


def has_recurrent_layers(model: Any) -> bool:
    """Does any layer keep a state (ArraysCache), alone or in a CacheList?"""
    return any(isinstance(layer, ArraysCache) for layer in _nested_layer_caches(model))


def batched_prefill_matches_rows(model: Any) -> bool:
    """Two prompts of different lengths through mlx-lm's BatchGenerator, against each alone:
    the same next-token distribution? Some recurrent families' layers (Mamba, Jamba in mlx-lm
    0.32.2) ignore the batch's row lengths, so a right-padded row's state runs on through its
    padding."""
    generator = BatchGenerator(model, stop_tokens=[], completion_batch_size=2, prefill_batch_size=2)
    try:
        uids = generator.insert([list(row) for row in PROBE_ROWS], max_tokens=[1, 1])
        batched: dict[int, mx.array] = {}
        while len(batched) < len(uids):
            _, responses = generator.next()
            batched.update((response.uid, response.logprobs) for response in responses)
    finally:
        generator.close()
    for uid, row in zip(uids, PROBE_ROWS, strict=True):
        logits = model(mx.array([row]), cache=make_prompt_cache(model))[0, -1]
        alone = logits - mx.logsumexp(logits)
        top = mx.argsort(-alone)[:PROBE_TOP_TOKENS]
        tolerance = PROBE_TOLERANCE.get(alone.dtype, PROBE_TOLERANCE_16_BIT)
        if bool((mx.abs(alone[top] - batched[uid][top]).max() > tolerance).item()):
            return False
    return True


def prefills_alone(model: Any) -> bool:
    """Should prompts be prefilled one at a time? For a recurrent model whose batched prefill
    fails the probe: each prompt then has no padding, and the decode steps (one token per row)
    batch as usual."""
    if not has_recurrent_layers(model) or batched_prefill_matches_rows(model):
        return False
    logger.warning(
        "this %r model's layers ignore a batch's row lengths (mlx-lm's fault): prompts are "
        "prefilled one at a time, decoding stays batched",
        family_name(model),
    )
    return True
