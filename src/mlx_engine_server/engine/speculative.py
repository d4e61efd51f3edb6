"""Speculative decoding inside the batch: every row's draft verified in one forward pass.

mlx-lm's GenerationBatch keeps, per row, one sampled token not yet fed to the model (its
"pending" token). A speculative step feeds each row its pending token followed by its draft,
right-padded to the longest draft (rows without a draft feed only their pending token), and
reads the model's choice at every position: a row keeps the longest prefix of its draft the
model agrees with (greedy: the same argmax; sampled: the rejection rule of SeededSampler), and
the model's own token after that prefix becomes its next pending token. The KV cache then
forgets each row's rejected positions (rewind.py).

A step where no row drafts is mlx-lm's own step, pipelined as usual; rows constrained by a
grammar never draft (their matcher consumes one token per step), and neither do rows whose
drafts keep failing (ngram.RowDrafter). A pacer compares the tokens per second of speculative
and plain steps and pauses drafting while it loses, as it does when a large batch is already
compute-bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, GenerationBatch

from .constraints import GrammarProcessor
from .ngram import DraftSettings, RowDrafter
from .rewind import rewind_rows
from .sampling import SeededSampler

OnVerified = Callable[[int, int], None]  # (tokens drafted, tokens accepted) in one step
BatchFactory = Callable[[Any, Any], "SpeculativeGenerationBatch"]
PROBE_EVERY_STEPS = 32  # plain steps among speculative ones keep the comparison fresh:
PROBE_STEPS = 3  # this many in a row, since a plain step's time shows in the one after it
MAX_PAUSE_STEPS = 256
RATE_EMA = 0.2


@dataclass
class StepPacer:
    """Tokens per second of speculative and plain steps; drafting pauses while it loses.

    A step's time is the wall time until the next step starts (the host's share included), and
    it counts only after a step of the same kind: a plain step's forward pass finishes during
    the following call, so the first step after a switch carries the other kind's work.
    """

    rates: dict[bool, float] = field(default_factory=dict)  # speculative? -> tokens/s
    paused_steps: int = 0
    pause_length: int = 1
    steps_since_plain: int = 0
    probe_steps: int = 0
    _last: tuple[bool, int, float] | None = None  # (speculative, tokens, started)
    _before_last: bool | None = None

    def allows_drafts(self) -> bool:
        if self.steps_since_plain >= PROBE_EVERY_STEPS:
            self.probe_steps = PROBE_STEPS
        if self.probe_steps > 0 or self.paused_steps > 0:
            self.probe_steps = max(0, self.probe_steps - 1)
            self.paused_steps = max(0, self.paused_steps - 1)
            return False
        return True

    def step_started(self, speculative: bool) -> None:
        now = time.perf_counter()
        last = self._last
        if last is not None and self._before_last == last[0] and now > last[2]:
            rate = last[1] / (now - last[2])
            old = self.rates.get(last[0], rate)
            self.rates[last[0]] = (1 - RATE_EMA) * old + RATE_EMA * rate
        self._before_last = last[0] if last is not None else None
        self.steps_since_plain = 0 if not speculative else self.steps_since_plain + 1
        self._judge()

    def step_done(self, speculative: bool, tokens: int, started: float) -> None:
        self._last = (speculative, tokens, started)

    def _judge(self) -> None:
        speculative, plain = self.rates.get(True), self.rates.get(False)
        if speculative is None or plain is None or self.paused_steps:
            return
        if speculative < plain:
            self.paused_steps = self.pause_length
            self.pause_length = min(MAX_PAUSE_STEPS, self.pause_length * 2)
            self.rates.pop(True)  # measured afresh after the pause
        else:
            self.pause_length = 1


@dataclass
class _RowOutcome:
    """What one row keeps of a speculative step."""

    emitted: list[int]  # its pending token, then the accepted draft tokens
    logprobs: list[mx.array]  # one vector per emitted token
    next_token: int
    next_logprobs: mx.array
    drafted: int
    accepted: int


class SpeculativeGenerationBatch(GenerationBatch):
    """mlx-lm's GenerationBatch, whose `next` verifies drafts when any row has one."""

    drafting: DraftSettings | None = None
    on_verified: OnVerified | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._drafters: dict[int, RowDrafter | None] = {}
        self.pacer = StepPacer()
        super().__init__(*args, **kwargs)

    def next(self) -> list[Any]:
        if not self.uids:
            return []
        started = time.perf_counter()
        drafters = [self._drafter(index) for index in range(len(self.uids))]
        if not self.pacer.allows_drafts():
            drafters = self._unpaced(drafters)
        if all(d is None or d.resting for d in drafters):
            return self._plain_step(drafters, started)
        mx.eval(self._next_tokens)
        pending: list[int] = self._next_tokens.tolist()  # type: ignore[assignment]
        drafts = self._drafts(pending, drafters)
        if not any(drafts):
            return self._plain_step([], started)
        self.pacer.step_started(speculative=True)
        responses = self._verify(pending, drafts, drafters)
        self.pacer.step_done(True, len(responses), started)
        return responses

    def filter(self, keep: list[int]) -> None:
        super().filter(keep)
        live = set(self.uids)
        self._drafters = {uid: d for uid, d in self._drafters.items() if uid in live}

    def _unpaced(self, drafters: list[RowDrafter | None]) -> list[RowDrafter | None]:
        """While the pacer pauses drafting, only seeded rows still draft: whether a step drafts
        decides which random numbers a seeded row draws, and the pacer's timing must not, or
        the same seed would not give the same text. Their own rests still apply."""
        kept: list[RowDrafter | None] = []
        for index, drafter in enumerate(drafters):
            seeded = self.samplers and isinstance(self.samplers[index], SeededSampler)
            if drafter is not None and not seeded and drafter.resting:
                drafter.skip_step()
            kept.append(drafter if seeded else None)
        return kept

    def _plain_step(self, drafters: list[RowDrafter | None], started: float) -> list[Any]:
        for drafter in drafters:
            if drafter is not None and drafter.resting:
                drafter.skip_step()
        self.pacer.step_started(speculative=False)
        responses: list[Any] = super().next()
        self.pacer.step_done(False, len(responses), started)
        return responses

    def _drafter(self, index: int) -> RowDrafter | None:
        """A row drafts if it samples greedily or with a SeededSampler and has no grammar."""
        uid = self.uids[index]
        if uid not in self._drafters:
            sampler = self.samplers[index] if self.samplers else None
            samples_known = sampler is None or sampler is self.fallback_sampler
            samples_known = samples_known or isinstance(sampler, SeededSampler)
            processors = self.logits_processors[index] if self.logits_processors else ()
            constrained = any(isinstance(p, GrammarProcessor) for p in processors)
            eligible = self.drafting is not None and samples_known and not constrained
            self._drafters[uid] = RowDrafter(self.drafting) if eligible and self.drafting else None
        return self._drafters[uid]

    def _drafts(self, pending: list[int], drafters: list[RowDrafter | None]) -> list[list[int]]:
        return [self._propose(i, d, pending[i]) for i, d in enumerate(drafters)]

    def _room(self, index: int) -> int:
        """Draft tokens row `index` may still take: its pending token and drafts stay within
        max_tokens."""
        return self.max_tokens[index] - self._num_tokens[index] - 1

    def _propose(self, index: int, drafter: RowDrafter | None, pending: int) -> list[int]:
        if drafter is None:
            return []
        if drafter.resting:
            drafter.skip_step()
            return []
        return drafter.propose([*self.tokens[index], pending], self._room(index))

    def _verify(
        self, pending: list[int], drafts: list[list[int]], drafters: list[RowDrafter | None]
    ) -> list[Any]:
        width = 1 + max(len(draft) for draft in drafts)
        rows = [
            [token, *draft] + [0] * (width - 1 - len(draft))
            for token, draft in zip(pending, drafts, strict=True)
        ]
        inputs = mx.array(rows, dtype=mx.uint32)
        logits = self._processed(inputs, self.model(inputs, cache=self.prompt_cache), drafts)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        outcomes = self._decide(pending, drafts, logprobs)
        rewind_rows(self.prompt_cache, [width - 1 - o.accepted for o in outcomes])
        self._advance(outcomes)
        drafted = accepted = 0
        for drafter, outcome in zip(drafters, outcomes, strict=True):
            if drafter is not None and outcome.drafted:
                drafter.record(outcome.drafted, outcome.accepted)
                drafted += outcome.drafted
                accepted += outcome.accepted
        if self.on_verified is not None:
            self.on_verified(drafted, accepted)
        return self._responses(outcomes)

    def _processed(self, inputs: mx.array, logits: mx.array, drafts: list[list[int]]) -> mx.array:
        """Logits processors (penalties, logit_bias) at every drafted position, each seeing the
        tokens before it; rows without processors are left as they are. The row's token
        context (mlx-lm's TokenBuffer) is only read here: _advance appends what was kept."""
        if not self.logits_processors or not any(self.logits_processors):
            return logits
        rows = []
        for index, processors in enumerate(self.logits_processors):
            if not processors:
                rows.append(logits[index])
                continue
            known = self._token_context[index].tokens
            fed = inputs[index].astype(known.dtype)
            positions = []
            for position in range(len(drafts[index]) + 1):
                context = mx.concatenate([known, fed[: position + 1]])
                row_logits = logits[index, position : position + 1]
                for processor in processors:
                    row_logits = processor(context, row_logits)
                positions.append(row_logits)
            positions.append(logits[index, len(positions) :])
            rows.append(mx.concatenate(positions, axis=0))
        return mx.stack(rows)

    def _decide(
        self, pending: list[int], drafts: list[list[int]], logprobs: mx.array
    ) -> list[_RowOutcome]:
        """Each row's accepted draft length and next token, all computed before one sync."""
        greedy = mx.argmax(logprobs, axis=-1)
        sampled: dict[int, tuple[mx.array, mx.array]] = {}
        for index, draft in enumerate(drafts):
            sampler = self.samplers[index] if self.samplers else None
            if isinstance(sampler, SeededSampler) and draft:
                sampled[index] = self._verify_sampled(
                    index, sampler, logprobs[index, : len(draft) + 1], draft
                )
            elif sampler is not None and sampler is not self.fallback_sampler:
                sampled[index] = (mx.array([], mx.bool_), sampler(logprobs[index, :1]))
        mx.eval(greedy, logprobs, sampled)
        greedy_rows: list[list[int]] = greedy.tolist()  # type: ignore[assignment]
        outcomes = []
        for index, draft in enumerate(drafts):
            if index in sampled:
                accepts: list[bool] = sampled[index][0].tolist()  # type: ignore[assignment]
                choices: list[int] = sampled[index][1].tolist()  # type: ignore[assignment]
                kept = _leading_true(accepts)
            else:
                choices = greedy_rows[index]
                kept = _leading_true([a == b for a, b in zip(choices, draft, strict=False)])
            outcomes.append(
                _RowOutcome(
                    emitted=[pending[index], *draft[:kept]],
                    logprobs=[
                        self._next_logprobs[index],
                        *(logprobs[index, j] for j in range(kept)),
                    ],
                    next_token=choices[kept],
                    next_logprobs=logprobs[index, kept],
                    drafted=len(draft),
                    accepted=kept,
                )
            )
        return outcomes

    def _verify_sampled(
        self, index: int, sampler: SeededSampler, logprobs: mx.array, draft: list[int]
    ) -> tuple[mx.array, mx.array]:
        """A prompt-lookup draft is a point mass: the one-token rejection rule."""
        return sampler.verify_drafts(logprobs, draft)

    def _advance(self, outcomes: list[_RowOutcome]) -> None:
        """The batch's state after the step: what the caches hold, and each pending token."""
        self._current_tokens = mx.array(  # type: ignore[assignment]  # mlx-lm's None default
            [o.emitted[0] for o in outcomes], dtype=mx.uint32
        )
        self._current_logprobs = [o.logprobs[0] for o in outcomes]
        self._next_tokens = mx.array([o.next_token for o in outcomes], dtype=mx.uint32)
        self._next_logprobs = [o.next_logprobs for o in outcomes]
        for index, outcome in enumerate(outcomes):
            self.tokens[index].extend(outcome.emitted)
            if self.logits_processors and self.logits_processors[index]:
                self._token_context[index].update_and_fetch(mx.array(outcome.emitted))

    def _responses(self, outcomes: list[_RowOutcome]) -> list[Any]:
        """One response per emitted token, in order; a row ends at its first finishing token."""
        keep, responses = [], []
        for index, outcome in enumerate(outcomes):
            finished = False
            for token, logprobs in zip(outcome.emitted, outcome.logprobs, strict=True):
                reason = self._finish_reason(index, token)
                finished = reason is not None
                done = finished and self._extracted(index)
                responses.append(
                    self.Response(
                        uid=self.uids[index],
                        token=token,
                        logprobs=logprobs,
                        finish_reason=reason,
                        prompt_cache=done[0] if done else None,
                        all_tokens=done[1] if done else None,
                    )
                )
                if finished:
                    break
            if not finished:
                keep.append(index)
        if len(keep) < len(self.uids):
            self.filter(keep)
        return responses

    def _finish_reason(self, index: int, token: int) -> str | None:
        self._num_tokens[index] += 1
        reason = "length" if self._num_tokens[index] >= self.max_tokens[index] else None
        if self._matchers[index].advance(token):
            reason = "stop"
        return reason

    def _extracted(self, index: int) -> tuple[list[Any], list[int]]:
        return self.extract_cache(index), self.tokens[index]


class SpeculativeBatchGenerator(BatchGenerator):
    """BatchGenerator whose running batch drafts and verifies (prefill is mlx-lm's own);
    `make_batch` (model, sampler) -> the running batch, which says where drafts come from."""

    def __init__(
        self,
        model: Any,
        *,
        drafting: DraftSettings,
        on_verified: OnVerified,
        make_batch: BatchFactory | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        batch = (make_batch or SpeculativeGenerationBatch.empty)(model, self.sampler)
        batch.drafting = drafting
        batch.on_verified = on_verified
        self._generation_batch = batch


def _leading_true(flags: list[bool]) -> int:
    for index, flag in enumerate(flags):
        if not flag:
            return index
    return len(flags)
