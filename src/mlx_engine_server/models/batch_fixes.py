"""Workarounds for mlx-lm families whose attention breaks when sequences are batched.

Gemma 2's attention reshapes its queries to five axes (batch, KV heads, repeats, positions, head
size) when KV heads are shared, while the batch mask keeps four (batch, 1, queries, keys): the two
broadcast wrongly. A batch larger than the KV-head count fails (`broadcast_shapes`); one equal to
it silently gives each row another row's mask. Giving the mask an axis for the repeats fixes it.

Whether the installed mlx-lm still has the fault is decided by behaviour, on a tiny probe at
start-up (batched output against each row alone), not by version: once mlx-lm is fixed the probe
passes and the workaround is no longer applied.
"""

from __future__ import annotations

import logging
from typing import Any

import mlx.core as mx
from mlx.nn.layers.base import Module
from mlx_lm.models import gemma2

logger = logging.getLogger(__name__)

PROBE_HEADS, PROBE_KV_HEADS, PROBE_HEAD_DIM = 4, 2, 4
PROBE_TOLERANCE = 1e-4


class _Gemma2MaskedAttention(gemma2.Attention):
    """Gemma 2's attention with a batch mask shaped for its five-axis queries."""

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        if isinstance(mask, mx.array) and mask.ndim == 4 and self.repeats > 1:  # noqa: PLR2004
            mask = mx.expand_dims(mask, -3)
        output: mx.array = super().__call__(x, mask=mask, cache=cache)
        return output


# The attention class of each family with the fault, and its fixed subclass.
FIXES: dict[type[Module], type[Module]] = {gemma2.Attention: _Gemma2MaskedAttention}


def fix_batched_attention(model: Module) -> int:
    """Swap in the fixed attention where the installed mlx-lm shows the fault; returns how many
    modules were changed."""
    fixed = 0
    for _, module in model.named_modules():  # type: ignore[no-untyped-call]
        replacement = FIXES.get(type(module))
        if replacement is not None and batch_mask_is_broken(type(module)):
            module.__class__ = replacement
            fixed += 1
    if fixed:
        logger.info("batched attention mask fixed in %d layers (mlx-lm's fault)", fixed)
    return fixed


_probed: dict[type[Module], bool] = {}


def batch_mask_is_broken(attention_class: type[Module]) -> bool:
    """Does a batch of two (with a padded row) differ from each row alone, or fail? Probed once
    per class and process."""
    if attention_class not in _probed:
        _probed[attention_class] = not _batch_matches_rows(_probe_attention(attention_class))
    return _probed[attention_class]


def _probe_attention(attention_class: Any) -> Module:
    args = gemma2.ModelArgs(
        model_type="gemma2",
        hidden_size=16,
        num_hidden_layers=1,
        intermediate_size=16,
        num_attention_heads=PROBE_HEADS,
        head_dim=PROBE_HEAD_DIM,
        rms_norm_eps=1e-6,
        vocab_size=8,
        num_key_value_heads=PROBE_KV_HEADS,
    )
    attention: Module = attention_class(args)  # randomly initialised, like any nn.Linear
    return attention


def _batch_matches_rows(attention: Module) -> bool:
    """Two rows of two positions; the second row's first position is padding."""
    x = mx.random.normal((PROBE_KV_HEADS, 2, 16), key=mx.random.key(1))
    causal = mx.array([[True, False], [True, True]])
    padded = mx.array([[False, False], [False, True]])
    mask = mx.stack([causal, padded])[:, None]  # (batch, 1, queries, keys)
    try:
        batched = attention(x, mask=mask)
        rows = [attention(x[row : row + 1], mask=mask[row : row + 1]) for row in range(2)]
        return bool(mx.allclose(batched, mx.concatenate(rows), atol=PROBE_TOLERANCE).item())
    except ValueError:
        return False
