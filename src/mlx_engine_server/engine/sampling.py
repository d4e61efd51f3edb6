"""Per-request samplers and logits processors, so every row of a batch keeps its own parameters."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import replace

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    make_logits_processors,
)

from .messages import SamplingParams

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


def make_request_sampler(params: SamplingParams) -> Sampler | None:
    """None means greedy: the batch's shared argmax, one call for every greedy row."""
    if params.temperature == 0:
        return None
    return SeededSampler(params)


def with_fixed_seed(params: SamplingParams) -> SamplingParams:
    """A sampled request with its seed chosen now, so that other processes can draw the same."""
    if params.temperature == 0 or params.seed is not None:
        return params
    return replace(params, seed=secrets.randbits(63))


class SeededSampler:
    """Samples with its own PRNG key: the same seed gives the same tokens, batched or not."""

    def __init__(self, params: SamplingParams) -> None:
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self._key = mx.random.key(seed % (2**63))
        self._params = params

    def __call__(self, logprobs: mx.array) -> mx.array:
        self._key, step_key = mx.random.split(self._key)
        return mx.random.categorical(self._scaled(logprobs), key=step_key)

    def verify_drafts(self, logprobs: mx.array, drafts: list[int]) -> tuple[mx.array, mx.array]:
        """Speculative sampling against a draft that is one token per position (a point mass).

        `logprobs` holds len(drafts) + 1 positions. Draft token t at position j is accepted with
        probability p_j(t); where it is rejected, the replacement comes from p_j with t removed
        and renormalised, which keeps every output token distributed as p (Leviathan et al.,
        2023, with q a point mass). Returns (accepted per draft, the token each position gives
        if the row stops there): the last one is the bonus token after a fully accepted draft.
        """
        scaled = self._scaled(logprobs)
        count = len(drafts)
        self._key, accept_key, sample_key = mx.random.split(self._key, 3)
        draft_ids = mx.array(drafts, dtype=mx.int32)[:, None]
        probs = mx.softmax(scaled[:count], axis=-1)
        chance = mx.take_along_axis(probs, draft_ids, axis=-1)[:, 0]
        accepted = mx.random.uniform(shape=(count,), key=accept_key) < chance
        without_draft = mx.put_along_axis(
            scaled[:count], draft_ids, mx.array(float("-inf"), scaled.dtype), axis=-1
        )
        candidates = mx.concatenate([without_draft, scaled[count:]], axis=0)
        return accepted, mx.random.categorical(candidates, key=sample_key)

    def verify_sampled_drafts(
        self, logprobs: mx.array, draft_logprobs: mx.array, drafts: list[int]
    ) -> tuple[mx.array, mx.array]:
        """Speculative sampling against a draft model's tokens, each drawn (by `__call__`) from
        q, this row's distribution over `draft_logprobs`: draft token t at position j is accepted
        with probability min(1, p_j(t) / q_j(t)); where it is rejected, the replacement comes
        from max(0, p_j - q_j) renormalised (Leviathan et al., 2023). Returns what
        verify_drafts returns."""
        scaled = self._scaled(logprobs)
        count = len(drafts)
        self._key, accept_key, sample_key = mx.random.split(self._key, 3)
        draft_ids = mx.array(drafts, dtype=mx.int32)[:, None]
        p = mx.softmax(scaled[:count], axis=-1)
        q = mx.softmax(self._scaled(draft_logprobs), axis=-1)
        p_draft = mx.take_along_axis(p, draft_ids, axis=-1)[:, 0]
        q_draft = mx.take_along_axis(q, draft_ids, axis=-1)[:, 0]
        accepted = mx.random.uniform(shape=(count,), key=accept_key) * q_draft < p_draft
        residual = mx.maximum(p - q, 0.0)
        # p == q leaves nothing to draw from, but then no draft is ever rejected.
        residual = mx.where(residual.sum(axis=-1, keepdims=True) > 0, residual, p)
        candidates = mx.concatenate([mx.log(residual), scaled[count:]], axis=0)
        return accepted, mx.random.categorical(candidates, key=sample_key)

    def _scaled(self, logprobs: mx.array) -> mx.array:
        """The row's filters (top_p, min_p, top_k) and temperature: what it samples from."""
        params = self._params
        if 0 < params.top_p < 1.0:
            logprobs = apply_top_p(logprobs, params.top_p)
        if params.min_p > 0:
            logprobs = apply_min_p(logprobs, params.min_p)
        if params.top_k > 0:
            logprobs = apply_top_k(logprobs, params.top_k)
        return logprobs * (1.0 / params.temperature)


def make_request_processors(params: SamplingParams) -> list[LogitsProcessor]:
    """Penalties look at every generated token of the request, as OpenAI's do."""
    window = params.max_tokens
    processors: list[LogitsProcessor] = make_logits_processors(
        logit_bias=dict(params.logit_bias) or None,
        repetition_penalty=params.repetition_penalty if params.repetition_penalty != 1.0 else None,
        repetition_context_size=window,
        presence_penalty=params.presence_penalty or None,
        presence_context_size=window,
        frequency_penalty=params.frequency_penalty or None,
        frequency_context_size=window,
    )
    return processors
