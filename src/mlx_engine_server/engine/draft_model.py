"""Speculative decoding with a draft model, the mlx-lm way, inside the batch.

A second, smaller model with the same tokenizer keeps its own batch KV cache, row for row with
the main one: a row's prompt is prefilled into it when the row joins the running batch, rows
leave it when they leave the batch, and after each verification it forgets what the main cache
forgot. A speculative step runs the draft model k times over the batch (k: the longest draft
any row wants this step), each row taking the draft's argmax (greedy rows) or a token drawn
from the draft's distribution q (seeded rows, verified with min(1, p/q) and a residual draw).

The draft cache may lag behind a row's tokens: plain steps (rows resting, the pacer pausing
drafting) feed only the main model, and a fully accepted draft leaves its last token unfed. The
first draft pass of the next speculative step feeds each drafting row what its cache lacks,
followed by its pending token, right-padded; rows that do not draft this step feed padding
only, and every padded position is forgotten again with the same per-row rewind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.generate import PromptProcessingBatch, _extend_cache
from mlx_lm.models.cache import make_prompt_cache

from .ngram import RowDrafter
from .rewind import rewind_rows
from .sampling import SeededSampler
from .speculative import BatchFactory, SpeculativeGenerationBatch, _RowOutcome


@dataclass
class _DraftPlan:
    """The shape of one step's drafting, kept until the draft cache is rewound."""

    lengths: list[int]  # tokens row i drafts this step (0: it only feeds padding)
    passes: int  # draft forward passes: the longest draft


class DraftModelGenerationBatch(SpeculativeGenerationBatch):
    """A SpeculativeGenerationBatch whose drafts come from a second model."""

    draft_model: Any = None
    draft_prefill_step_size: int = 512

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.draft_cache: list[Any] = []
        self._draft_known: list[int] = []  # row i's tokens the draft cache holds
        self._draft_q: dict[int, mx.array] = {}  # row index -> its drafts' logprobs (q)
        self._plan: _DraftPlan | None = None
        super().__init__(*args, **kwargs)

    def extend(self, batch: Any) -> None:
        super().extend(batch)  # type: ignore[no-untyped-call]
        if not batch.uids:
            return
        prefill = PromptProcessingBatch(
            self.draft_model,
            list(batch.uids),
            [make_prompt_cache(self.draft_model) for _ in batch.uids],
            prefill_step_size=self.draft_prefill_step_size,
        )
        prefill.prompt([list(tokens) for tokens in batch.tokens])
        self.draft_cache = _extend_cache(self.draft_cache, prefill.prompt_cache)
        self._draft_known.extend(len(tokens) for tokens in batch.tokens)

    def filter(self, keep: list[int]) -> None:
        super().filter(keep)
        if not keep:
            self.draft_cache.clear()
        else:
            for layer in self.draft_cache:
                layer.filter(keep)
        self._draft_known = [self._draft_known[index] for index in keep]

    def _drafts(self, pending: list[int], drafters: list[RowDrafter | None]) -> list[list[int]]:
        lengths = [self._wanted(index, drafter) for index, drafter in enumerate(drafters)]
        passes = max(lengths)
        self._draft_q = {}
        if passes == 0:
            return [[] for _ in lengths]
        first = [
            [*self.tokens[index][self._draft_known[index] :], pending[index]] if length else []
            for index, length in enumerate(lengths)
        ]
        self._plan = _DraftPlan(lengths, passes)
        width = int(self._next_logprobs[0].shape[-1])
        tokens = self._first_draft_pass(first, width)
        chosen = [tokens]
        for position in range(1, passes):
            logits = self.draft_model(tokens[:, None], cache=self.draft_cache)[:, -1, :]
            tokens = self._choose(logits, width, position)
            chosen.append(tokens)
        mx.eval(chosen, self._draft_q)
        rows: list[list[int]] = mx.stack(chosen, axis=1).tolist()  # type: ignore[assignment]
        return [row[:length] for row, length in zip(rows, lengths, strict=True)]

    def _wanted(self, index: int, drafter: RowDrafter | None) -> int:
        if drafter is None:
            return 0
        if drafter.resting:
            drafter.skip_step()
            return 0
        return max(0, min(drafter.draft_length, self._room(index)))

    def _first_draft_pass(self, first: list[list[int]], width: int) -> mx.array:
        """Each drafting row feeds what the draft cache lacks and its pending token; the padding
        after them (and the rows that feed nothing) is forgotten before the next pass."""
        longest = max(len(tokens) for tokens in first)
        inputs = mx.array([tokens + [0] * (longest - len(tokens)) for tokens in first])
        logits = self.draft_model(inputs, cache=self.draft_cache)
        last = mx.array([max(0, len(tokens) - 1) for tokens in first])
        logits = mx.take_along_axis(logits, last[:, None, None], axis=1)[:, 0, :]
        padding = [longest - len(tokens) for tokens in first]
        if any(padding):
            rewind_rows(self.draft_cache, padding)
        return self._choose(logits, width, 0)

    def _choose(self, logits: mx.array, width: int, position: int) -> mx.array:
        """Greedy rows take the draft's argmax; seeded rows draw from its distribution q, only
        for the positions they draft (so that their random draws do not depend on the other
        rows). The logits are cut or padded to the main model's vocabulary, so that every
        draft token is one the main model can read and score."""
        logits = _fit_vocabulary(logits, width)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tokens = mx.argmax(logprobs, axis=-1)
        plan = self._plan
        if not self.samplers or plan is None:
            return tokens
        picks = []
        for index, sampler in enumerate(self.samplers):
            if isinstance(sampler, SeededSampler) and position < plan.lengths[index]:
                row = logprobs[index : index + 1]
                picks.append(sampler(row)[0])
                known = self._draft_q.get(index)
                self._draft_q[index] = row if known is None else mx.concatenate([known, row])
            else:
                picks.append(tokens[index])
        return mx.stack(picks).astype(mx.uint32)

    def _verify_sampled(
        self, index: int, sampler: SeededSampler, logprobs: mx.array, draft: list[int]
    ) -> tuple[mx.array, mx.array]:
        return sampler.verify_sampled_drafts(logprobs, self._draft_q[index], draft)

    def _advance(self, outcomes: list[_RowOutcome]) -> None:
        """The draft cache keeps, of what this step fed it, the pending token and the accepted
        drafts it has seen; a fully accepted draft's last token stays for the next step."""
        plan = self._plan
        if plan is not None:
            later = plan.passes - 1  # positions each row gained after the first pass
            forget = []
            for index, outcome in enumerate(outcomes):
                kept = min(outcome.accepted, later) if plan.lengths[index] else 0
                forget.append(later - kept)
                if plan.lengths[index]:
                    self._draft_known[index] = len(self.tokens[index]) + 1 + kept
            if any(forget):
                rewind_rows(self.draft_cache, forget)
            self._plan = None
        super()._advance(outcomes)


def draft_batch_factory(draft_model: Any, prefill_step_size: int) -> BatchFactory:
    def make(model: Any, sampler: Any) -> SpeculativeGenerationBatch:
        batch: DraftModelGenerationBatch = DraftModelGenerationBatch.empty(model, sampler)
        batch.draft_model = draft_model
        batch.draft_prefill_step_size = prefill_step_size
        return batch

    return make


def _fit_vocabulary(logits: mx.array, width: int) -> mx.array:
    size = logits.shape[-1]
    if size == width:
        return logits
    if size > width:
        return logits[..., :width]
    pad = mx.full((*logits.shape[:-1], width - size), -mx.inf, dtype=logits.dtype)
    return mx.concatenate([logits, pad], axis=-1)
