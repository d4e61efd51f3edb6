"""Every message that crosses the engine boundary survives the codec; nothing else decodes."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from mlx_engine_server.engine.messages import (
    Admitted,
    Cancel,
    Drain,
    EngineFailed,
    EngineOptions,
    EngineReport,
    EngineSpec,
    EngineStats,
    Failed,
    Finished,
    GroupInfo,
    ModelInfo,
    PrefixCacheStats,
    ReadReport,
    Ready,
    Report,
    SamplingParams,
    StepEvents,
    Stop,
    Submit,
    TextDelta,
    TokenLogprob,
    TopLogprob,
    Usage,
    VisionPrompt,
    decode,
    encode,
)

PARAMS = SamplingParams(
    max_tokens=5, temperature=0.5, seed=3, logit_bias=((1, 2.0),), stop=("\n",), grammar="x"
)
MODEL = ModelInfo(
    model_id="m",
    model_path="/m",
    resolved_path="/m",
    adapter_path=None,
    kind="text",
    context_window=2048,
    quantization="q4",
    created=1,
    device="Device(cpu, 0)",
    dtype="float32",
    mlx_version="0.32",
    engine_pid=42,
    group=GroupInfo("ring", 2, 0, "tensor"),
)
STATS = EngineStats(1, 2, 3, 4, 5, 6, 7.5)
LOGPROB = TokenLogprob(7, b"\xe2\x82", -0.5, (TopLogprob(8, b"a", -1.0),))
MESSAGES = [
    Submit(1, (((1, 2, 3), PARAMS), ((4,), SamplingParams(max_tokens=1))), 12.5),
    Cancel(1),
    Drain(3.0),
    Stop(),
    ReadReport(9),
    Ready(MODEL),
    StepEvents(
        (
            (1, 0, Admitted(4)),
            (1, 0, TextDelta("é", (7,), (LOGPROB,))),
            (1, 0, Finished("stop", Usage(3, 1, 2, summary=Usage(1, 1)), stop_sequence="\n")),
            (2, 1, Failed("gone", kind="shutdown")),
        )
    ),
    Report(9, EngineReport(STATS, {"budget_bytes": 1}, {"active_bytes": 2}, None)),
    Report(9, EngineReport(STATS, None, {}, PrefixCacheStats(1, 2, 3, 4, 5, 6))),
    EngineFailed("boom", exit_code=-9),
    EngineSpec("/m", None, None, "/cache", False, EngineOptions(max_batch_size=4)),
    EngineSpec("/m.gguf", None, None, "/cache", False, EngineOptions(), gguf_requantize="4"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda message: type(message).__name__)
def test_every_message_round_trips(message: object) -> None:
    assert decode(encode(message)) == message


def test_a_vision_prompt_keeps_its_arrays() -> None:
    arrays = {"pixel_values": np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)}
    prompt = VisionPrompt((1, 2), arrays, "digest")
    message = decode(encode(Submit(1, (((1, 2), PARAMS),), 1.0, prompt)))
    assert isinstance(message, Submit)
    assert message.vision is not None
    got = message.vision.arrays["pixel_values"]
    assert got.dtype == np.float32
    assert np.array_equal(got, arrays["pixel_values"])


class Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo should-not-run",))


def test_a_frame_naming_any_other_callable_is_refused() -> None:
    with pytest.raises(pickle.UnpicklingError, match="not an engine message"):
        decode(pickle.dumps(Exploit()))
