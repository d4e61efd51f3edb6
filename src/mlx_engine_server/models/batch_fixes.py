"""Workarounds for mlx-lm families that go wrong when sequences are batched.

Gemma 2's attention reshapes its queries to five axes (batch, KV heads, repeats, positions, head
size) when KV heads are shared, while the batch mask keeps four (batch, 1, queries, keys): the two
broadcast wrongly. A batch larger than the KV-head count fails (`broadcast_shapes`); one equal to
it silently gives each row another row's mask. Giving the mask an axis for the repeats fixes it.

Nemotron-H's Mamba 2 mixer does not hand the batch's row lengths to `ssm_update` (mlx-lm's Mamba 2
and Falcon-H1 do): prompts prefilled together are right-padded, and a shorter row's recurrent
state runs on through the padding, so every row but the longest starts generating from a wrong
state. Passing the lengths fixes it.

Whether the installed mlx-lm still has a fault is decided by behaviour, on a tiny probe at
start-up (batched against each row alone), not by version: once mlx-lm is fixed the probe passes
and the workaround is no longer applied.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx.nn.layers.base import Module
from mlx_lm.models import gemma2, nemotron_h
from mlx_lm.models.cache import ArraysCache
from mlx_lm.models.ssm import ssm_update

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


class _NemotronHMixerWithLengths(nemotron_h.NemotronHMamba2Mixer):
    """Nemotron-H's Mamba 2 mixer, its state taken at each row's own length."""

    def _ssm(  # noqa: PLR0917 (mlx-lm's signature)
        self,
        hidden_states: mx.array,
        B: mx.array,
        C: mx.array,
        dt: mx.array,
        cache: ArraysCache | None,
        mask: mx.array | None,
    ) -> mx.array:
        batch_size, seq_len, _ = hidden_states.shape
        hidden_states = hidden_states.reshape(batch_size, seq_len, self.num_heads, self.head_dim)
        B = B.reshape(batch_size, seq_len, self.n_groups, self.ssm_state_size)
        C = C.reshape(batch_size, seq_len, self.n_groups, self.ssm_state_size)
        state, lengths = (cache[1], cache.lengths) if cache is not None else (None, None)
        limits = self.time_step_limit or (0.0, float("inf"))  # what ModelArgs defaults it to
        y, state = ssm_update(
            hidden_states,
            self.A_log,
            B,
            C,
            self.D.astype(hidden_states.dtype),
            dt,
            self.dt_bias,
            state,
            limits,
            mask,
            lengths,
        )
        if cache is not None:
            cache[1] = state
        output: mx.array = y.reshape(batch_size, seq_len, self.intermediate_size)
        return output


@dataclass(frozen=True)
class BatchFix:
    fixed: type[Module]  # the subclass swapped in
    batch_matches_rows: Callable[[type[Module]], bool]  # the probe, given either class


def fix_batched_layers(model: Module) -> int:
    """Swap in the fixed layer where the installed mlx-lm shows the fault; returns how many
    modules were changed."""
    fixed = 0
    for _, module in model.named_modules():  # type: ignore[no-untyped-call]
        fix = FIXES.get(type(module))
        if fix is not None and batch_is_broken(type(module)):
            module.__class__ = fix.fixed
            fixed += 1
    if fixed:
        logger.info("batched layers fixed in %d modules (mlx-lm's fault)", fixed)
    return fixed


_probed: dict[type[Module], bool] = {}


def batch_is_broken(module_class: type[Module]) -> bool:
    """Does a batch of two (with a padded row) differ from each row alone, or fail? Probed once
    per class and process; `module_class` is a faulty class or its fix."""
    if module_class not in _probed:
        fix = next(fix for base, fix in FIXES.items() if issubclass(module_class, base))
        _probed[module_class] = not fix.batch_matches_rows(module_class)
    return _probed[module_class]


def _gemma2_batch_matches_rows(attention_class: type[Module]) -> bool:
    """Two rows of two positions; the second row's first position is padding."""
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
    attention: Any = attention_class(args)  # type: ignore[call-arg]  # randomly initialised
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


def _nemotron_h_batch_matches_rows(mixer_class: type[Module]) -> bool:
    """Rows of three and one positions prefilled together, right-padded as mlx-lm's batch does:
    each row's recurrent state must be the one it reaches alone."""
    args = nemotron_h.ModelArgs.from_dict(
        {
            "model_type": "nemotron_h",
            "vocab_size": 8,
            "hidden_size": 16,
            "intermediate_size": 16,
            "max_position_embeddings": 16,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "attention_bias": False,
            "mamba_num_heads": 2,
            "mamba_head_dim": 8,
            "mamba_proj_bias": False,
            "ssm_state_size": 4,
            "conv_kernel": 2,
            "n_groups": 1,
            "mlp_bias": False,
            "layer_norm_epsilon": 1e-5,
            "use_bias": False,
            "use_conv_bias": True,
            "hybrid_override_pattern": ["M", "*"],
        }
    )
    mixer: Any = mixer_class(args)  # type: ignore[call-arg]
    x = mx.random.normal((2, 3, 16), key=mx.random.key(1))
    lengths = [3, 1]
    batch = ArraysCache(2)
    batch.prepare(lengths=lengths)
    mixer(x, batch.make_mask(3), batch)
    for row, length in enumerate(lengths):
        alone = ArraysCache(2)
        mixer(x[row : row + 1, :length], None, alone)
        if not mx.allclose(batch[1][row], alone[1][0], atol=PROBE_TOLERANCE).item():
            return False
    return True


# The faulty class of each family, its fix and its probe.
FIXES: dict[type[Module], BatchFix] = {
    gemma2.Attention: BatchFix(_Gemma2MaskedAttention, _gemma2_batch_matches_rows),
    nemotron_h.NemotronHMamba2Mixer: BatchFix(
        _NemotronHMixerWithLengths, _nemotron_h_batch_matches_rows
    ),
}
