"""The one thread that owns MLX: it loads the model, then steps every live request as one batch.

Requests arrive through a bounded inbox between steps and join the running batch (mlx-lm's
BatchGenerator does the continuous batching and chunked prefill). Each step's tokens are decoded
per request and posted back as plain events. A failure ends the requests it touched, never the
thread. How the batch is built (speculation, quantized KV caches) is `batch_setup.py`; how a
request leaves it, `sequence_endings.py`; the thread around the worker, `worker_thread.py`.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx_lm.generate import StopSequences

from ..models.loader import LoadedModel
from .batch_setup import PREFILL_BATCH, BatchSetup
from .cache_keeping import CacheKeeping
from .constraints import GrammarProcessor, TokenVocabulary
from .counters import Counters
from .decode_fold import fold_quantized_decode, should_fold
from .distributed.group import GroupError
from .logprobs import LogprobRequest, gather_logprobs
from .memory import MemoryLedger, measure_memory, with_draft_model
from .messages import (
    Admitted,
    Drain,
    EngineOptions,
    Failed,
    FinishReason,
    SamplingParams,
    Stop,
    TextDelta,
    TokenLogprob,
)
from .model_fit import (
    check_batchable,
    check_options_fit,
    first_quantized_pass,
    has_uncuttable_layers,
    prefills_alone,
)
from .prefix_cache import CacheHit, PrefixCache
from .sampling import make_request_processors, make_request_sampler
from .sequence_endings import SequenceEndings
from .sequences import LiveSequence, Submission
from .stop_text import StopTextFilter
from .vision_prefill import VisionPrefill, advance_vision_prefill, begin_vision_prefill

logger = logging.getLogger(__name__)

IDLE_POLL_S = 0.5
# While a batch decodes, requests that arrive one by one wait up to this long to join together:
# each group that joins costs a merge of every layer's KV cache into the running batch, and rows
# that start together finish together (one filter, not one per row). Measured on an H200 with 64
# clients arriving over HTTP: ~25 groups per burst, 20 ms a merge and 9 ms a filter, a quarter of
# the burst's time. A request that arrives when nothing decodes starts at once.
ADMIT_WINDOW_S = 0.05
NO_STOP = StopSequences(None)
# What a client is told when a grammar breaks; the parser's own words (its grammar and state)
# go to the log only.
GRAMMAR_INVALID = "the grammar could not be used"
CONSTRAINED_DECODING_FAILED = "constrained decoding failed"


STOP = Stop()


class Worker(BatchSetup, SequenceEndings, CacheKeeping):
    def __init__(
        self,
        loaded: LoadedModel,
        options: EngineOptions,
        inbox: queue.Queue[Any],
        *,
        flush: Callable[[], None] = lambda: None,
    ) -> None:
        self.loaded = loaded
        self._flush = flush  # after each step: hand what the step posted to the front
        self.options = options
        self.inbox = inbox
        self.counters = Counters()
        self._live: dict[int, LiveSequence] = {}
        self._stopping = False
        self._drain_deadline: float | None = None
        self.prefix_cache = PrefixCache(options.prefix_cache_bytes)
        check_batchable(loaded.model)
        check_options_fit(loaded.model, options, loaded.draft_model)
        # Where a finished row's cache cannot be cut back to a shorter prefix (a recurrent state,
        # a wrapped window), its state at the end of the prompt is kept too: the exact boundary
        # every later turn of the conversation starts with.
        self._keeps_prompt_states = has_uncuttable_layers(loaded.model)
        self._prefills_alone = loaded.vision is None and prefills_alone(loaded.model)
        prefill_tokens = min(PREFILL_BATCH, options.max_batch_size) * options.prefill_step_size
        measured = first_quantized_pass(
            loaded.model,
            options,
            lambda: measure_memory(
                loaded.model, options.memory_budget_bytes, prefill_tokens, self._empty_cache
            ),
        )
        if loaded.draft_model is not None:
            measured = with_draft_model(measured, loaded.draft_model)
        self.memory = MemoryLedger(measured)
        if options.fold_quantized_decode and should_fold():
            logger.info(
                "folded %d quantized layers for batched decode", fold_quantized_decode(loaded.model)
            )
        self._waiting: deque[Submission] = deque()
        self._prefilling: deque[VisionPrefill] = deque()
        self.vocabulary = TokenVocabulary(
            loaded.tokenizer._tokenizer, sorted(loaded.tokenizer.eos_token_ids)
        )
        self._generator = self._new_generator()

    def run(self) -> None:
        """The thread's main loop; returns after stop() once the inbox drains."""
        while not self._stopping or self._live:
            try:
                self._admit(block=not self._live and not self._waiting and not self._prefilling)
                self._drop_abandoned()
                self._admit_waiting()
                if self._prefilling:
                    self._advance_prefill()
                self._share_plan()
                if self._live:
                    self._step()
            except GroupError:
                raise  # the group is gone: nothing this rank does can recover it
            except Exception:
                # Whatever went wrong ends the requests in flight, never the thread.
                logger.exception("the generation loop failed")
                self._fail_all("internal error in the generation engine")
            self._flush()
        self._flush()
        self._generator.close()

    def _share_plan(self) -> None:
        """Before each step, rank 0 of a group sends its decisions; a process alone has none."""

    def _admit(self, *, block: bool) -> None:
        while True:
            try:
                item = self.inbox.get(block=block, timeout=IDLE_POLL_S if block else None)
            except queue.Empty:
                return
            if isinstance(item, Stop):
                self._stopping = True
                self._cancel_all()
                return
            if isinstance(item, Drain):
                self._drain_deadline = item.deadline
            else:
                self._waiting.append(item)
            block = False

    def _admit_waiting(self) -> None:
        """Start waiting requests in arrival order while their memory fits the budget."""
        if self._gathering():
            return
        while self._waiting:
            submission = self._waiting[0]
            params = submission.params
            need = self.memory.model.request_bytes(len(submission.prompt_tokens), params.max_tokens)
            if not self.memory.could_ever_fit(need):
                self._waiting.popleft()
                self._end(submission, Failed(_too_big(need, self.memory), kind="memory"))
                continue
            if not self.memory.fits(need, self.prefix_cache.bytes):
                # Cached prefixes are a luxury: running requests come first.
                room = self.memory.model.room_bytes - self.memory.reserved_bytes - need
                self._shrink_prefix_cache(max(0, room))
            if not self.memory.fits(need, self.prefix_cache.bytes):
                return  # wait for running requests to finish
            self._waiting.popleft()
            self._insert(submission, need)

    def forget_warmup(self) -> None:
        """After the start-up requests: no counts and no cached prefixes of theirs remain.
        Called while the worker waits on an empty inbox."""
        self.counters = Counters()
        self.prefix_cache = PrefixCache(self.options.prefix_cache_bytes)

    def _gathering(self) -> bool:
        """Hold the waiting requests a moment so that they join the running batch as a group."""
        if not self._live or not self._waiting:
            return False
        room = self.options.max_batch_size - len(self._live)
        if len(self._waiting) >= min(PREFILL_BATCH, max(room, 1)):
            return False
        return time.monotonic() - self._waiting[0].arrived_at < ADMIT_WINDOW_S

    def _shrink_prefix_cache(self, max_bytes: int) -> None:
        self.prefix_cache.shrink_to(max_bytes)

    def _insert(self, submission: Submission, need_bytes: int) -> int | None:
        """Start `submission`: its generator row, or None if it ended or prefills its images."""
        prompt = list(submission.prompt_tokens)
        hit = self.prefix_cache.lookup(prompt, submission.cache_partition)
        self.memory.reserve(need_bytes)
        if submission.vision is None:
            return self._join_batch(submission, need_bytes, hit)
        vision = self.loaded.vision
        if vision is None:  # the HTTP side refuses images for a text model: a bug if seen
            self._end_unstarted(submission, need_bytes, "this model does not read images")
            return None
        self._prefilling.append(begin_vision_prefill(vision, submission, need_bytes, hit))
        return None

    def _advance_prefill(self) -> None:
        """One step of the oldest prompt with images; once prefilled, it joins the batch."""
        prefill = self._prefilling[0]
        vision = self.loaded.vision
        try:
            if not prefill.finished and vision is not None:
                with mx.stream(self._generator.stream):
                    advance_vision_prefill(vision, prefill, self.options.prefill_step_size)
        except Exception as exc:
            logger.exception("the prefill of a prompt with images failed")
            self._prefilling.popleft()
            message = f"could not process the images: {type(exc).__name__}: {exc}"
            self._end_unstarted(prefill.submission, prefill.reserved_bytes, message)
            return
        if prefill.finished:
            self._prefilling.popleft()
            done = CacheHit(prefill.cache, len(prefill.prompt.token_ids) - 1)
            self._join_batch(
                prefill.submission, prefill.reserved_bytes, done, prefill.cached_tokens
            )

    def _join_batch(
        self,
        submission: Submission,
        need_bytes: int,
        hit: CacheHit,
        cached_tokens: int | None = None,
    ) -> int | None:
        """Into the batch, the first `hit.cached_tokens` positions already in `hit.cache`."""
        params = submission.params
        prompt = list(submission.prompt_tokens)
        sampler = make_request_sampler(params)
        try:
            processors, grammar = self._processors(params)
            if grammar is not None and grammar.error is not None:
                logger.warning("a request's grammar is invalid: %s", grammar.error)
                self._end_unstarted(submission, need_bytes, GRAMMAR_INVALID)
                return None
            with mx.stream(self._generator.stream):
                (uid,) = self._generator.insert(
                    [prompt[hit.cached_tokens :]],
                    max_tokens=[params.max_tokens],
                    caches=self._row_caches(hit),
                    all_tokens=[prompt[: hit.cached_tokens]],
                    samplers=[sampler] if sampler else None,
                    logits_processors=[processors],
                    stop_sequences=[NO_STOP] if params.ignore_eos and not grammar else None,
                )
        except Exception as exc:
            logger.exception("could not admit a request")
            message = f"could not start generation: {type(exc).__name__}"
            self._end_unstarted(submission, need_bytes, message)
            return None
        self.counters.requests_total += 1
        self.counters.prompt_tokens_total += len(submission.prompt_tokens)
        live = LiveSequence(
            submission=submission,
            detokenizer=self.loaded.tokenizer.detokenizer,
            stop_filter=StopTextFilter(params.stop),
            cached_tokens=hit.cached_tokens if cached_tokens is None else cached_tokens,
            reserved_bytes=need_bytes,
            grammar=grammar,
        )
        self._live[uid] = live
        self.counters.active = len(self._live)
        submission.post(Admitted(cached_tokens=live.cached_tokens))
        return int(uid)

    def _processors(self, params: SamplingParams) -> tuple[list[Any], GrammarProcessor | None]:
        processors = make_request_processors(params)
        if params.grammar is None:
            return processors, None
        # ignore_eos on a constrained row: the grammar decides the end, the model's wish does not.
        grammar = GrammarProcessor(
            self.vocabulary, params.grammar, eos_only_when_forced=params.ignore_eos
        )
        return [*processors, grammar], grammar

    def _step(self) -> None:
        try:
            prompts_done, responses = self._generator.next()
        except Exception as exc:
            # One bad step (an allocation failure, a kernel error) ends the requests in it.
            logger.exception("a generation step failed")
            self._fail_all(f"generation failed: {type(exc).__name__}")
            return
        if self._keeps_prompt_states:
            self._keep_prompt_states(prompts_done)
        self.counters.record_step(len(responses))
        logprobs = self._logprobs(responses)
        for response, logprob in zip(responses, logprobs, strict=True):
            sequence = self._live.get(response.uid)
            if sequence is None:
                continue
            if sequence.grammar is not None and sequence.grammar.error is not None:
                logger.warning("constrained decoding failed: %s", sequence.grammar.error)
                self._fail_one(response.uid, CONSTRAINED_DECODING_FAILED)
                continue
            try:
                self._on_token(response.uid, sequence, response, logprob)
            except Exception as exc:
                logger.exception("handling a generated token failed")
                self._fail_one(response.uid, f"internal error: {type(exc).__name__}")

    def _logprobs(self, responses: list[Any]) -> list[TokenLogprob | None]:
        """One per response (a speculative step gives a row several); only rows that asked
        cost anything; an end-of-sequence token has none."""
        asking = []
        for position, response in enumerate(responses):
            sequence = self._live.get(response.uid)
            top = sequence.submission.params.logprobs if sequence is not None else None
            if top is not None and response.finish_reason != "stop":
                asking.append((position, LogprobRequest(response.logprobs, response.token, top)))
        found: list[TokenLogprob | None] = [None] * len(responses)
        if asking:
            gathered = gather_logprobs([row for _, row in asking], self.vocabulary.token_bytes)
            for (position, _), logprob in zip(asking, gathered, strict=True):
                found[position] = logprob
        return found

    def _on_token(
        self, uid: int, sequence: LiveSequence, response: Any, logprob: TokenLogprob | None
    ) -> None:
        token: int = response.token
        finish: FinishReason | None = response.finish_reason
        sequence.completion_tokens += 1
        sequence.pending_ids.append(token)
        if logprob is not None:
            sequence.pending_logprobs.append(logprob)
        if finish != "stop":  # an end-of-sequence token is not text
            sequence.detokenizer.add_token(token)
        if finish is not None:
            sequence.detokenizer.finalize()
        text, stopped = sequence.stop_filter.feed(sequence.detokenizer.last_segment)
        if finish is not None and not stopped:
            text += sequence.stop_filter.flush()
        self._post_text(sequence, text, last=finish is not None or stopped)
        if stopped and finish is None:
            removed = self._generator.remove([uid], return_prompt_caches=True)
            self._keep_cache(sequence, *removed[uid])
            finish = "stop"
        elif finish is not None:
            self._keep_cache(sequence, response.prompt_cache, response.all_tokens)
            if stopped:  # the last allowed token completed a stop string: that is what ended it
                finish = "stop"
        if finish is not None:
            self._finish(uid, finish, sequence.stop_filter.matched)

    def _post_text(self, sequence: LiveSequence, text: str, *, last: bool = False) -> None:
        """Text with the tokens that made it; at the end, also tokens that made no text."""
        if not text and not (last and sequence.pending_logprobs):
            return
        ids, sequence.pending_ids = tuple(sequence.pending_ids), []
        logprobs, sequence.pending_logprobs = tuple(sequence.pending_logprobs), []
        sequence.submission.post(TextDelta(text=text, token_ids=ids, logprobs=logprobs))

    def _fail_one(self, uid: int, message: str) -> None:
        if uid not in self._live:
            return
        try:
            self._generator.remove([uid])
        except Exception:
            logger.exception("could not remove a failed request from the batch")
        sequence = self._retire(uid)
        self._end(sequence.submission, Failed(message))

    def _fail_all(self, message: str) -> None:
        for uid in list(self._live):
            sequence = self._retire(uid)
            self._end(sequence.submission, Failed(message))
        self._end_prefills(Failed(message))
        self._generator.close()
        self._generator = self._new_generator()


def _too_big(need_bytes: int, memory: MemoryLedger) -> str:
    return (
        f"this request needs about {need_bytes / 2**20:.0f} MiB for its KV cache and prefill, "
        f"more than the {memory.model.room_bytes / 2**20:.0f} MiB the memory budget leaves "
        "beside the model; lower max_tokens or shorten the prompt"
    )
