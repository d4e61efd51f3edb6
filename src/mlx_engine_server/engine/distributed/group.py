"""One model over several processes: MLX's distributed group as the engine sees it.

`mlx.launch` (ring, MPI, NCCL or JACCL) starts the same command N times; `mx.distributed.init()`
joins them. Rank 0 serves HTTP and decides everything; each step it shares its decisions with
every rank through one `all_sum` (the others contribute zeros), so all ranks step identical
batches. No transport of our own: MLX's collectives carry the control bytes too.

A collective whose peer is gone fails (the ring backend raises "connection to a peer was lost")
or blocks forever (a peer that hangs). Either way the group cannot go on: the rank fails what it
holds and ends the process with EXIT_GROUP_FAILED, so the launcher ends the rest.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..messages import DistributedMode, GroupInfo

logger = logging.getLogger(__name__)


EXIT_GROUP_FAILED = 3
FRAME_BYTES = 256  # fits a plan without new requests; new prompts take a second collective
LENGTH_BYTES = 4

# The environment each launcher gives its processes, in the order MLX's "any" tries backends.
_BACKEND_MARKERS = (
    ("mpi", ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")),
    ("jaccl", ("MLX_IBV_DEVICES",)),
    ("ring", ("MLX_HOSTFILE",)),
    ("nccl", ("NCCL_HOST_IP",)),
)


class GroupError(Exception):
    """The group cannot go on: a peer is gone or stuck, or the ranks no longer agree."""


@dataclass(frozen=True)
class Group:
    """This process's place in the group, and MLX's group object for loading and collectives."""

    info: GroupInfo
    handle: mx.distributed.Group
    timeout_s: float


def join_group(mode: DistributedMode, timeout_s: float) -> Group | None:
    """The group `mlx.launch` started this process in; None when it runs alone."""
    handle = mx.distributed.init()
    if handle.size() == 1:
        return None
    info = GroupInfo(backend_in_use(), handle.size(), handle.rank(), mode)
    logger.info("rank %d of %d (%s backend, %s parallel)", info.rank, info.size, info.backend, mode)
    return Group(info, handle, timeout_s)


def backend_in_use() -> str:
    """MLX does not name the backend it joined; each launcher leaves its own traces."""
    for name, markers in _BACKEND_MARKERS:
        if any(os.environ.get(marker) for marker in markers):
            return name
    return "unknown"


class StepChannel:
    """Rank 0's bytes to every rank: a fixed frame (length, then payload) and, if longer, the rest.

    A broadcast is an all_sum to which the other ranks add zeros; every rank must call it the
    same number of times, which is what keeps the group in step. It runs on the generation
    stream: the model's own all_sums of a step still being evaluated there come first on every
    rank, whereas collectives on two streams could pair up differently on each rank.
    """

    def __init__(self, handle: mx.distributed.Group) -> None:
        self._handle = handle

    def publish(self, payload: bytes, stream: mx.Stream) -> None:
        head = len(payload).to_bytes(LENGTH_BYTES, "little") + payload[: FRAME_BYTES - LENGTH_BYTES]
        self._sum(head.ljust(FRAME_BYTES, b"\0"), stream)
        if len(payload) > FRAME_BYTES - LENGTH_BYTES:
            self._sum(payload, stream)

    def receive(self, stream: mx.Stream) -> bytes:
        frame = self._sum(bytes(FRAME_BYTES), stream)
        length = int.from_bytes(frame[:LENGTH_BYTES], "little")
        if length <= FRAME_BYTES - LENGTH_BYTES:
            return frame[LENGTH_BYTES : LENGTH_BYTES + length]
        return self._sum(bytes(length), stream)

    def _sum(self, data: bytes, stream: mx.Stream) -> bytes:
        array = mx.array(np.frombuffer(data, dtype=np.uint8))
        summed = mx.distributed.all_sum(array, group=self._handle, stream=stream)
        return np.asarray(summed).tobytes()


class Watchdog:
    """Calls `on_stall` once if `beat()` is not called for `timeout_s`: a peer hangs.

    Collectives have no timeout of their own; a rank blocked in one can only be ended from
    another thread.
    """

    def __init__(self, timeout_s: float, on_stall: Callable[[str], None]) -> None:
        self._timeout_s = timeout_s
        self._on_stall = on_stall
        self._last_beat = time.monotonic()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="group-watchdog", daemon=True)

    def start(self) -> None:
        self.beat()
        self._thread.start()

    def beat(self) -> None:
        self._last_beat = time.monotonic()

    def stop(self) -> None:
        self._stopped.set()

    def _watch(self) -> None:
        poll_s = min(1.0, self._timeout_s / 4)
        while not self._stopped.wait(poll_s):
            silent_s = time.monotonic() - self._last_beat
            if silent_s > self._timeout_s:
                self._on_stall(f"no step completed for {silent_s:.1f} s: a rank is gone or stuck")
                return


def end_process(after_s: float) -> None:
    """Leave now, whatever other threads do: a collective can block the normal exit forever."""
    time.sleep(after_s)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_GROUP_FAILED)
