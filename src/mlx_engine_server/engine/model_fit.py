"""Which engine options a model's layers can take, decided at start-up, before any request.

Speculative decoding rewinds rejected rows and `--kv-bits` quantizes them: both need every layer
to hold a plain KV cache, which can be cut back and quantized. A sliding window (RotatingKVCache)
or a recurrent state (ArraysCache, and CacheList holding one) cannot, so those options are
refused by name for such a model. An attention that reads keys and values itself instead of
through mlx-lm's attention helper (DeepSeek's latent attention) cannot read a quantized cache:
its failure on the first quantized pass is turned into the same kind of refusal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from mlx_lm.models.cache import make_prompt_cache

from ..errors import StartupError
from .messages import EngineOptions

T = TypeVar("T")


def layer_cache_kinds(model: Any) -> set[str]:
    """The class names of the caches mlx-lm makes for `model`'s layers."""
    return {type(layer).__name__ for layer in make_prompt_cache(model)}


def family_name(model: Any) -> str:
    """mlx-lm's `model_type` of the model (its module's name where it keeps no args)."""
    model_type = getattr(getattr(model, "args", None), "model_type", None)
    return str(model_type or type(model).__module__.rsplit(".", 1)[-1])


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
