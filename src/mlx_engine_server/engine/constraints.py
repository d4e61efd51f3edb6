"""Constrained decoding: a llguidance matcher per row, its token mask applied with plain mx ops.

llguidance's own MLX helper is a Metal-only kernel; a bitmask unpacked with shifts and a `where`
runs on Metal, CUDA and CPU alike. The mask for a row's next token needs the token it sampled last,
so a constrained row waits for that token on the host (unconstrained rows never do).
"""

from __future__ import annotations

import threading
from typing import Any

import llguidance
import llguidance.hf
import mlx.core as mx
import numpy as np

NEG_INF = float("-inf")
BIT_SHIFTS = np.arange(32, dtype=np.uint32)


class TokenVocabulary:
    """The model's tokenizer as llguidance sees it: built once, on first use (about a second)."""

    def __init__(self, hf_tokenizer: Any, eos_token_ids: list[int]) -> None:
        self._hf_tokenizer = hf_tokenizer
        self._eos_token_ids = eos_token_ids
        self._built: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._built is None:
                self._built = llguidance.hf.from_tokenizer(
                    self._hf_tokenizer, eos_token=self._eos_token_ids
                )
            return self._built

    def token_bytes(self, token_id: int) -> bytes:
        return bytes(self.tokenizer.decode_bytes([token_id]))


class GrammarFailedError(Exception):
    """The matcher left the grammar (a sampler picked a masked token, or the grammar broke)."""


class GrammarProcessor:
    """A logits processor (mlx-lm's `(tokens, logits) -> logits`) for one row of the batch.

    The first call sees the prompt; every later call first feeds the matcher the token the row
    sampled in the step before. With `eos_only_when_forced`, end-of-sequence is masked out
    whenever the grammar allows anything else (ignore_eos on a constrained row).
    """

    def __init__(
        self,
        vocabulary: TokenVocabulary,
        grammar: str,
        *,
        eos_only_when_forced: bool = False,
    ) -> None:
        self._vocabulary = vocabulary
        self._matcher = llguidance.LLMatcher(
            vocabulary.tokenizer, llguidance.LLMatcher.grammar_from_lark(grammar)
        )
        self._started = False
        self._eos_only_when_forced = eos_only_when_forced
        self.error: str | None = self._matcher.get_error() if self._matcher.is_error() else None

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self._started:
            last = int(tokens[-1].item())  # type: ignore[arg-type]
            mx.async_eval(logits)  # type: ignore[no-untyped-call]  # the forward pass runs while the host computes the mask
            if not self._matcher.consume_token(last):
                self.error = self._matcher.get_error() or f"token {last} left the grammar"
        self._started = True
        if self.error is not None:
            return logits  # the worker ends this row after the step
        return mask_logits(logits, self._allowed_bits())

    def _allowed_bits(self) -> np.ndarray[Any, np.dtype[np.uint32]]:
        words = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint32)
        if self._eos_only_when_forced:
            words = self._without_optional_eos(words)
        return words

    def _without_optional_eos(
        self, words: np.ndarray[Any, np.dtype[np.uint32]]
    ) -> np.ndarray[Any, np.dtype[np.uint32]]:
        without = words.copy()
        for eos in self._vocabulary.tokenizer.eos_tokens:
            word, bit = divmod(eos, 32)
            without[word] &= ~np.uint32(1 << bit)
        return without if without.any() else words


def mask_logits(logits: mx.array, words: np.ndarray[Any, np.dtype[np.uint32]]) -> mx.array:
    """-inf wherever the bitmask (one bit per token, little-endian words) has a 0."""
    vocab_size = logits.shape[-1]
    bits = (mx.array(words)[:, None] >> mx.array(BIT_SHIFTS)) & 1
    allowed = bits.reshape(-1)
    if allowed.size >= vocab_size:
        allowed = allowed[:vocab_size]
    else:  # padded embedding rows the tokenizer never produces
        allowed = mx.concatenate([allowed, mx.zeros(vocab_size - allowed.size, mx.uint32)])
    return mx.where(allowed.astype(mx.bool_), logits, mx.array(NEG_INF, logits.dtype))
