"""One collective over MLX's NCCL backend, printed per rank: does the group come up at all?

Run it on every rank (by `mlx.launch --backend nccl` or by hand with MLX_RANK, MLX_WORLD_SIZE,
NCCL_HOST_IP, NCCL_PORT and CUDA_VISIBLE_DEVICES set); each rank prints a line before and after
each phase, flushed, so a hang shows where it stopped.
"""

from __future__ import annotations

import os
import sys
import time

import mlx.core as mx


def say(rank: str, what: str) -> None:
    print(f"[rank {rank} +{time.monotonic() - STARTED:.1f}s] {what}", flush=True)


STARTED = time.monotonic()


def main() -> None:
    rank = os.environ.get("MLX_RANK", "?")
    keys = ("MLX_WORLD_SIZE", "NCCL_HOST_IP", "NCCL_PORT", "CUDA_VISIBLE_DEVICES")
    say(rank, " ".join(f"{key}={os.environ.get(key)}" for key in keys))
    say(rank, f"mlx {mx.__version__}, device {mx.default_device()}, cuda {mx.cuda.is_available()}")
    say(rank, "init(backend='nccl', strict=True) ...")
    group = mx.distributed.init(backend="nccl", strict=True)
    say(rank, f"group rank {group.rank()} of {group.size()}")
    total = mx.distributed.all_sum(mx.ones(1024) * (group.rank() + 1), group=group)
    mx.eval(total)
    expected = group.size() * (group.size() + 1) / 2
    say(rank, f"all_sum = {total[0].item()} (expected {expected})")
    sys.exit(0 if total[0].item() == expected else 1)


if __name__ == "__main__":
    main()
