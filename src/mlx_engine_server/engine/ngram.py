"""Prompt-lookup drafting: guess a row's next tokens from where its last n tokens appeared before.

Each row keeps an index from every n-gram of its context (prompt and output so far) to the
position right after its latest occurrence, filled as tokens arrive, so a lookup is one dict
probe. How many tokens a row drafts adapts to how many of its drafts were accepted: rows that
copy (edits, refactors, quoting answers) draft long, rows whose drafts keep failing rest for a
growing number of steps, so that drafting costs them nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_REST_STEPS = 64  # the longest a failing row goes without trying a draft
ACCEPT_EMA = 0.5  # weight of the newest verification in a row's acceptance rate


@dataclass(frozen=True)
class DraftSettings:
    num_draft_tokens: int  # the most tokens one row drafts in one step
    ngram_size: int  # tokens matched against the context to find a draft


@dataclass
class RowDrafter:
    """One row's n-gram index and its adaptive draft length."""

    settings: DraftSettings
    index: dict[tuple[int, ...], int] = field(default_factory=dict)
    indexed: int = 0  # context positions already in `index`
    acceptance: float = 1.0  # recent share of drafted tokens that were accepted
    rest_steps: int = 0  # steps left without drafting
    rest_length: int = 1  # how long the next rest lasts

    @property
    def resting(self) -> bool:
        return self.rest_steps > 0

    def skip_step(self) -> None:
        self.rest_steps -= 1

    def propose(self, context: list[int], limit: int) -> list[int]:
        """Up to min(limit, the adaptive length) tokens that followed the context's last n-gram
        the latest time it appeared before; [] when it never did."""
        self._index_up_to(context)
        size = self.settings.ngram_size
        wanted = min(limit, self.draft_length)
        if wanted <= 0 or len(context) <= size:
            return []
        start = self.index.get(tuple(context[-size:]))
        if start is None:
            self._rest()
            return []
        return context[start : start + wanted]

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

    def _index_up_to(self, context: list[int]) -> None:
        """Map each n-gram to the position after it; the context's own last n-gram is left out
        (nothing follows it yet), so a lookup finds an earlier occurrence."""
        size = self.settings.ngram_size
        for end in range(max(self.indexed, size), len(context)):
            self.index[tuple(context[end - size : end])] = end
        self.indexed = max(self.indexed, len(context))
