"""The parts of a distributed group that need no second process: plans, watchdog, start-up checks.

The group itself (two ranks under the real `mlx.launch`) is tested in test_distributed.py.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest

from mlx_engine_server.engine.distributed.group import StepChannel, Watchdog
from mlx_engine_server.engine.distributed.step_plan import (
    InsertOp,
    RemoveOp,
    ShrinkOp,
    StepPlan,
    decode_plan,
    encode_plan,
)
from mlx_engine_server.engine.messages import SamplingParams
from mlx_engine_server.engine.sampling import with_fixed_seed
from mlx_engine_server.errors import StartupError
from mlx_engine_server.models.loader import ModelSource, Sharding, check_heads_divide, load_model


def test_a_plan_survives_the_bytes_between_ranks() -> None:
    params = SamplingParams(
        max_tokens=9,
        temperature=0.7,
        seed=123,
        logit_bias=((5, -100.0), (7, 2.5)),
        stop=("\n\n", "END"),
        grammar='start: "a" | "b"',
        logprobs=2,
    )
    plan = StepPlan(ops=(InsertOp(4, (1, 2, 3), params, 4096, 2), RemoveOp(3), ShrinkOp(0)), live=2)
    assert decode_plan(encode_plan(plan)) == plan
    assert decode_plan(encode_plan(StepPlan(stop=True))) == StepPlan(stop=True)


def test_sampled_requests_get_their_seed_before_they_are_shared() -> None:
    assert with_fixed_seed(SamplingParams(max_tokens=1, temperature=0)).seed is None
    assert with_fixed_seed(SamplingParams(max_tokens=1, seed=5)).seed == 5
    drawn = {with_fixed_seed(SamplingParams(max_tokens=1)).seed for _ in range(4)}
    assert None not in drawn
    assert len(drawn) > 1


def test_a_channel_of_one_process_sends_and_receives_nothing() -> None:
    """Alone, an all_sum returns what it is given: what rank 0 publishes, a follower's zeros."""
    channel = StepChannel(mx.distributed.init())
    stream = mx.default_stream(mx.default_device())
    channel.publish(b"x" * 10_000, stream)
    assert channel.receive(stream) == b""


def test_the_watchdog_fires_once_when_beats_stop_and_never_while_they_come() -> None:
    stalls: list[str] = []
    fired = threading.Event()

    def on_stall(reason: str) -> None:
        stalls.append(reason)
        fired.set()

    watchdog = Watchdog(0.4, on_stall)
    watchdog.start()
    for _ in range(8):  # 0.8 s of beats every 0.1 s: longer than the timeout, but never silent
        time.sleep(0.1)
        watchdog.beat()
    assert not stalls
    assert fired.wait(timeout=5)
    time.sleep(0.3)
    watchdog.stop()
    assert len(stalls) == 1
    assert "a rank is gone or stuck" in stalls[0]


def test_a_family_without_pipeline_support_is_a_clear_start_up_error(
    tiny_model_dir: Path,
) -> None:
    """mlx-lm checks the family before any collective: a group of one shows the same error."""
    alone = Sharding(mx.distributed.init(), "pipeline")
    with pytest.raises(StartupError, match=r"pipeline-parallel over 1 processes.*pipelining"):
        load_model(ModelSource(str(tiny_model_dir)), alone)


def test_an_adapter_is_refused_in_a_group(tiny_model_dir: Path, tmp_path: Path) -> None:
    source = ModelSource(str(tiny_model_dir), adapter_path=str(tmp_path))
    with pytest.raises(StartupError, match="LoRA adapter cannot be loaded across"):
        load_model(source, Sharding(mx.distributed.init(), "tensor"))


@pytest.mark.parametrize(
    ("config", "size", "named"),
    [
        ({"num_attention_heads": 6, "num_key_value_heads": 2}, 4, "num_attention_heads (6)"),
        ({"num_attention_heads": 8, "num_key_value_heads": 2}, 4, "num_key_value_heads (2)"),
        ({"text_config": {"num_attention_heads": 6}}, 4, "num_attention_heads (6)"),
    ],
)
def test_head_counts_the_group_size_does_not_divide_are_refused(
    config: dict[str, Any], size: int, named: str
) -> None:
    with pytest.raises(StartupError, match=re.escape(named)):
        check_heads_divide(config, size)
    check_heads_divide({"num_attention_heads": 8, "num_key_value_heads": 4}, size)
