"""The prefill of a prompt with images, done by the worker in steps between batch steps.

mlx-lm's BatchGenerator prefills from token ids; a prompt with images needs input embeddings
(image features merged in by the model's vision tower). So the worker makes them itself: first
the embeddings, then the language model over them one chunk per worker step into the request's
own KV cache, leaving the last (text) token. The request then joins the batch with that cache and
decodes like any other. Text requests keep decoding between the chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from ..models.mrope import set_row_delta
from ..models.vision import PromptFeatures, VisionParts, vision_input_embeddings
from .messages import VisionPrompt
from .prefix_cache import CacheHit


@dataclass
class VisionPrefill:
    """One prompt with images on its way into the batch."""

    submission: Any  # the worker's Submission
    prompt: VisionPrompt
    reserved_bytes: int
    cache: list[Any]
    cached_tokens: int  # positions the prefix cache supplied
    done_tokens: int  # positions already in `cache`
    features: PromptFeatures | None = None

    @property
    def finished(self) -> bool:
        """Every position but the last is in the cache; the last token goes into the batch."""
        return self.done_tokens >= len(self.prompt.token_ids) - 1


def begin_vision_prefill(
    vision: VisionParts, submission: Any, reserved_bytes: int, hit: CacheHit
) -> VisionPrefill:
    prompt: VisionPrompt = submission.vision
    cache = hit.cache if hit.cache is not None else make_prompt_cache(vision.decoder)
    return VisionPrefill(
        submission=submission,
        prompt=prompt,
        reserved_bytes=reserved_bytes,
        cache=cache,
        cached_tokens=hit.cached_tokens,
        done_tokens=hit.cached_tokens,
    )


def advance_vision_prefill(vision: VisionParts, prefill: VisionPrefill, step_tokens: int) -> None:
    """One step: the embeddings (vision tower) first, then one chunk of the language model."""
    features = prefill.features
    if features is None:
        # Image features are merged by position, so embeddings are made for the whole prompt
        # even when a cached prefix lets the language model skip part of it.
        prefill.features = features = vision_input_embeddings(vision, prefill.prompt)
        mx.eval(features.embeddings, features.positions)
        if vision.decoder.mrope:
            set_row_delta(prefill.cache, features.rope_delta)
        return
    start = prefill.done_tokens
    stop = min(start + step_tokens, len(prefill.prompt.token_ids) - 1)
    tokens = mx.array([prefill.prompt.token_ids[start:stop]])
    extras = dict(features.extras)  # full-prompt arrays: mlx-vlm aligns them by cache offset
    if features.positions is not None:
        extras["position_ids"] = features.positions[:, :, start:stop]
    embeddings = features.embeddings[:, start:stop]
    vision.decoder(tokens, cache=prefill.cache, inputs_embeds=embeddings, **extras)
    mx.eval([layer.state for layer in prefill.cache])
    prefill.done_tokens = stop
    if prefill.finished:
        prefill.features = None
        mx.clear_cache()
