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
        params = self._params
        if 0 < params.top_p < 1.0:
            logprobs = apply_top_p(logprobs, params.top_p)
        if params.min_p > 0:
            logprobs = apply_min_p(logprobs, params.min_p)
        if params.top_k > 0:
            logprobs = apply_top_k(logprobs, params.top_k)
        self._key, step_key = mx.random.split(self._key)
        return mx.random.categorical(logprobs * (1.0 / params.temperature), key=step_key)


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
