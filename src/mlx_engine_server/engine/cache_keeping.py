"""How finished and freshly prefilled rows leave their caches to the prefix cache."""

from __future__ import annotations

from typing import Any

from mlx_lm.generate import BatchGenerator

from .prefix_cache import PrefixCache
from .sequences import LiveSequence


class CacheKeeping:
    prefix_cache: PrefixCache
    _live: dict[int, LiveSequence]
    _generator: BatchGenerator

    def _keep_cache(
        self, sequence: LiveSequence, cache: list[Any] | None, tokens: list[int] | None
    ) -> None:
        """A finished request's cache serves the next turn of its conversation."""
        if cache and tokens:
            self.prefix_cache.store(list(tokens), cache, sequence.submission.cache_partition)

    def _keep_prompt_states(self, prompt_responses: list[Any]) -> None:
        """Rows whose whole prompt has just been fed: their cache, exactly that prompt's."""
        ended = [r.uid for r in prompt_responses if r.end_of_prompt and r.uid in self._live]
        if not ended:
            return
        for uid, (cache, tokens) in self._generator.extract_cache(ended).items():
            self._keep_cache(self._live[uid], cache, tokens)
