"""Prompt-lookup drafting: guess a row's next tokens from where its last n tokens appeared before.

Each row keeps an index from every n-gram of its context (prompt and output so far), for every n
from `ngram_min_size` to `ngram_size`, to the position right after its latest occurrence. It is
filled as tokens arrive (one dict write per size per token), and a lookup tries the longest
n-gram first and falls back to shorter ones: at most one dict probe per size. As vLLM's
NgramProposer, the longest match wins; unlike it (the earliest occurrence) and llama.cpp's
ngram cache (the most frequent next token, drafted one token per lookup), the latest occurrence
gives the draft, since edits and refactors copy what they read last, and one probe gives the whole
continuation. How many tokens a row drafts adapts to how many of its drafts were accepted: rows that
copy (edits, refactors, quoting answers) draft long, rows whose drafts keep failing rest for a
growing number of steps, so that drafting costs them nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_REST_STEPS = 64  # the longest a row whose drafts are rejected goes without trying a draft
# A row whose context has no match yet rests only briefly: a lookup costs a dict probe, and an
# edit's answer often opens with words of its own before it starts copying.
MAX_MISS_REST_STEPS = 4
ACCEPT_EMA = 0.5  # weight of the newest verification in a row's acceptance rate


@dataclass(frozen=True)
class DraftSettings:
    num_draft_tokens: int  # the most tokens one row drafts in one step
    ngram_size: int  # the longest run of tokens matched against the context to find a draft
    ngram_min_size: int = 2  # the shortest, tried when no longer one matches

    @property
    def sizes(self) -> range:
        """The n-gram sizes a lookup tries, longest first."""
        return range(self.ngram_size, min(self.ngram_min_size, self.ngram_size) - 1, -1)


@dataclass
class RowDrafter:
    """One row's n-gram index and its adaptive draft length."""

    settings: DraftSettings
    index: dict[tuple[int, ...], int] = field(default_factory=dict)
    indexed: int = 0  # context positions already in `index`
    acceptance: float = 1.0  # recent share of drafted tokens that were accepted
    rest_steps: int = 0  # steps left without drafting
    rest_length: int = 1  # how long the next rest after a rejected draft lasts
    miss_rest_length: int = 1  # how long the next rest after finding no match lasts

    @property
    def resting(self) -> bool:
        return self.rest_steps > 0

    def skip_step(self) -> None:
        self.rest_steps -= 1

    def propose(self, context: list[int], limit: int) -> list[int]:
        """Up to min(limit, the adaptive length) tokens that followed the context's longest
        final n-gram that appeared before, the latest time it did; [] when none did."""
        self._index_up_to(context)
        wanted = min(limit, self.draft_length)
        if wanted <= 0:
            return []
        start = self._match(context)
        if start is None:
            self._rest_after_miss()
            return []
        self.miss_rest_length = 1
        return context[start : start + wanted]

    def _match(self, context: list[int]) -> int | None:
        """Where the continuation of the longest matching final n-gram starts."""
        for size in self.settings.sizes:
            if len(context) > size:
                start = self.index.get(tuple(context[-size:]))
                if start is not None:
                    return start
        return None

    @property
    def draft_length(self) -> int:
        most = self.settings.num_draft_tokens
        return max(1, min(most, round(most * self.acceptance) + 1))

    def record(self, drafted: int, accepted: int) -> None:
        rate = accepted / drafted
        self.acceptance = (1 - ACCEPT_EMA) * self.acceptance + ACCEPT_EMA * rate
        if accepted == 0:
            self._rest()
        else:
            self.rest_length = 1

    def _rest(self) -> None:
        self.rest_steps = self.rest_length
        self.rest_length = min(MAX_REST_STEPS, self.rest_length * 2)

    def _rest_after_miss(self) -> None:
        self.rest_steps = self.miss_rest_length
        self.miss_rest_length = min(MAX_MISS_REST_STEPS, self.miss_rest_length * 2)

    def _index_up_to(self, context: list[int]) -> None:
        """Map each n-gram of every size to the position after it; the context's own final
        n-grams are left out (nothing follows them yet), so a lookup finds earlier ones."""
        sizes = self.settings.sizes
        for end in range(self.indexed, len(context)):
            for size in sizes:
                if end >= size:
                    self.index[tuple(context[end - size : end])] = end
        self.indexed = max(self.indexed, len(context))
