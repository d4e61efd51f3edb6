"""How the worker builds its batch: mlx-lm's BatchGenerator, or the speculative one drafting by
n-grams or with a draft model, and each new row's KV cache (mlx-lm's own, or quantized layers
under --kv-bits). A base class of `Worker`."""

from __future__ import annotations

from typing import Any

from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import make_prompt_cache

from ..errors import StartupError
from ..models.loader import LoadedModel
from .counters import Counters
from .draft_model import draft_batch_factory
from .messages import EngineOptions
from .ngram import DraftSettings
from .prefix_cache import CacheHit
from .quantized_kv import as_row_cache, empty_row_cache
from .speculative import SpeculativeBatchGenerator

PREFILL_BATCH = 8  # prompts prefilled together


class BatchSetup:
    loaded: LoadedModel
    options: EngineOptions
    counters: Counters
    _prefills_alone: bool

    def _new_generator(self) -> BatchGenerator:
        eos_ids = sorted(self.loaded.tokenizer.eos_token_ids)
        settings: dict[str, Any] = {
            "stop_tokens": [[token] for token in eos_ids],
            "completion_batch_size": self.options.max_batch_size,
            "prefill_batch_size": 1
            if self._prefills_alone
            else min(PREFILL_BATCH, self.options.max_batch_size),
            "prefill_step_size": self.options.prefill_step_size,
        }
        drafting = DraftSettings(
            self.options.num_draft_tokens, self.options.ngram_size, self.options.ngram_min_size
        )
        if self.options.speculative == "ngram":
            return SpeculativeBatchGenerator(
                self.loaded.model, drafting=drafting, on_verified=self._count_drafts, **settings
            )
        if self.options.speculative == "draft":
            return SpeculativeBatchGenerator(
                self.loaded.model,
                drafting=drafting,
                on_verified=self._count_drafts,
                make_batch=draft_batch_factory(self._draft_model(), self.options.prefill_step_size),
                **settings,
            )
        return BatchGenerator(self.loaded.model, **settings)

    def _draft_model(self) -> Any:
        if self.loaded.draft_model is None:
            raise StartupError("--speculative draft needs --draft-model")
        return self.loaded.draft_model

    def _count_drafts(self, drafted: int, accepted: int) -> None:
        self.counters.record_drafts(drafted, accepted)

    def _empty_cache(self, model: Any) -> list[Any]:
        """A new row's cache: mlx-lm's own, or quantized layers under --kv-bits."""
        bits = self.options.kv_bits
        if bits is None:
            return make_prompt_cache(model)
        group_size = self.options.kv_group_size
        return empty_row_cache(len(make_prompt_cache(model)), group_size, bits)

    def _row_caches(self, hit: CacheHit) -> list[list[Any]] | None:
        bits = self.options.kv_bits
        if bits is None:
            return [hit.cache] if hit.cache else None
        if hit.cache:
            return [as_row_cache(hit.cache, self.options.kv_group_size, bits)]
        return [self._empty_cache(self.loaded.model)]
