"""The worker of a distributed group: rank 0 leads (decides, shares, steps), the others follow.

Both run the single-process Worker's code for everything that follows from the model's output
(tokens, stop strings, finished requests, prefix-cache entries): the sharded layers all-reduce
their results, so every rank sees the same logits and takes the same path. What only rank 0 can
see (its inbox, clients that left, deadlines, its memory budget) reaches the others as a
StepPlan before each step. A follower checks that it agrees (same generator row, same cached
prefix, same batch size); if it does not, or a collective fails, the group ends.
"""

from __future__ import annotations

import logging
import math
import queue
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ...models.loader import LoadedModel
from ..messages import Cancellation, EngineOptions, Event, Failed
from ..sampling import with_fixed_seed
from ..sequences import Submission
from ..worker import Worker
from .group import Group, GroupError, StepChannel, Watchdog
from .step_plan import InsertOp, Op, RemoveOp, ShrinkOp, StepPlan, decode_plan, encode_plan

logger = logging.getLogger(__name__)


class GroupWorker(Worker):
    def __init__(
        self,
        loaded: LoadedModel,
        options: EngineOptions,
        inbox: queue.Queue[Any],
        *,
        group: Group,
        on_failure: Callable[[str], None],
        flush: Callable[[], None] = lambda: None,
    ) -> None:
        if options.speculative != "none":
            # Whether a step drafts depends on timings each rank measures on its own: ranks
            # would run forward passes of different shapes and their collectives would hang.
            raise ValueError("--speculative is not available under mlx.launch yet")
        super().__init__(loaded, options, inbox, flush=flush)
        self.group = group
        self._channel = StepChannel(group.handle)
        self._on_failure = on_failure
        self._watchdog = Watchdog(group.timeout_s, on_failure)
        self._journal: list[Op] = []  # rank 0's decisions since its last plan

    def run(self) -> None:
        self._watchdog.start()
        try:
            self._serve_group()
        except GroupError as exc:
            self._on_failure(str(exc))
        except Exception as exc:  # a collective whose peer is gone, or a bug: the group ends
            logger.exception("rank %d failed", self.group.info.rank)
            self._on_failure(f"{type(exc).__name__}: {exc}")
        finally:
            self._watchdog.stop()

    def _serve_group(self) -> None:
        raise NotImplementedError

    def fail_in_flight(self, message: str) -> None:
        """End every request held or not yet read: the group failed and this process ends.

        Called from another thread while the worker is blocked in a collective, so it only reads
        (copies of) the worker's state and posts events.
        """
        failed = Failed(message, kind="shutdown")  # 503: the server is going away
        held = [sequence.submission for sequence in list(self._live.values())]
        for submission in [*held, *list(self._waiting)]:
            submission.post(failed)
        controls = []  # STOP and Drain stay for the worker, should it still read them
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Submission):
                item.post(failed)
            else:
                controls.append(item)
        for item in controls:
            self.inbox.put(item)

    def _fail_all(self, message: str) -> None:
        """Alone, a failed step ends its requests; in a group the ranks may no longer agree."""
        raise GroupError(message)


class LeaderWorker(GroupWorker):
    """Rank 0: the single-process loop, recording the decisions the other ranks must copy."""

    def _serve_group(self) -> None:
        Worker.run(self)
        self._publish(StepPlan(tuple(self._journal), stop=True))

    def _share_plan(self) -> None:
        self._publish(StepPlan(tuple(self._journal), live=len(self._live)))
        self._journal.clear()
        self._watchdog.beat()

    def _publish(self, plan: StepPlan) -> None:
        self._channel.publish(encode_plan(plan), self._generator.stream)

    def _insert(self, submission: Submission, need_bytes: int) -> int | None:
        submission = replace(submission, params=with_fixed_seed(submission.params))
        uid = super()._insert(submission, need_bytes)
        if uid is not None:
            cached = self._live[uid].cached_tokens
            params = submission.params
            self._journal.append(
                InsertOp(uid, submission.prompt_tokens, params, need_bytes, cached)
            )
        return uid

    def _remove(self, uid: int, event: Failed) -> None:
        super()._remove(uid, event)
        self._journal.append(RemoveOp(uid))

    def _shrink_prefix_cache(self, max_bytes: int) -> None:
        super()._shrink_prefix_cache(max_bytes)
        self._journal.append(ShrinkOp(max_bytes))


class FollowerWorker(GroupWorker):
    """Ranks 1..N-1: apply rank 0's plan, step, discard the events; no HTTP, no inbox."""

    def _serve_group(self) -> None:
        while True:
            plan = decode_plan(self._channel.receive(self._generator.stream))
            self._watchdog.beat()
            for op in plan.ops:
                self._apply(op)
            if plan.stop:
                break
            if len(self._live) != plan.live:
                self._diverged(f"{len(self._live)} rows in the batch, rank 0 has {plan.live}")
            if self._live:
                self._step()
        self._generator.close()

    def _apply(self, op: Op) -> None:
        if isinstance(op, InsertOp):
            self._insert_as_told(op)
        elif isinstance(op, RemoveOp):
            if op.uid not in self._live:
                self._diverged(f"rank 0 removed row {op.uid}, which this rank does not hold")
            self._remove(op.uid, Failed("removed by rank 0"))
        else:
            self._shrink_prefix_cache(op.max_bytes)

    def _insert_as_told(self, op: InsertOp) -> None:
        submission = Submission(op.prompt_tokens, op.params, math.inf, Cancellation(), _discard)
        uid = self._insert(submission, op.need_bytes)
        if uid != op.uid:
            self._diverged(f"a request became row {uid}, on rank 0 row {op.uid}")
        cached = self._live[op.uid].cached_tokens
        if cached != op.cached_tokens:
            self._diverged(f"{cached} prompt tokens found cached, rank 0 found {op.cached_tokens}")

    def _diverged(self, detail: str) -> None:
        raise GroupError(f"rank {self.group.info.rank} no longer agrees with rank 0: {detail}")


def _discard(_event: Event) -> None:
    """A follower's events: rank 0 answers the client with its own, identical ones."""
