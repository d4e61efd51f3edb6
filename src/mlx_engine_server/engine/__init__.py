"""The generation engine: one MLX thread steps every live request as one batch, in a process of
its own (engine/process.py) or a thread (engine/local.py); the front reaches it only through
EngineClient (engine/client.py) and the messages of engine/messages.py.

Importing this package imports no MLX: the front's view of the engine is the client and messages.
"""

from .client import EngineClient, FrontModel
from .generation import Generation, TimingObserver
from .messages import (
    Admitted,
    EngineOptions,
    EngineReport,
    EngineStats,
    Event,
    Failed,
    Finished,
    ModelInfo,
    SamplingParams,
    TextDelta,
    TokenLogprob,
    TopLogprob,
    Usage,
    VisionPrompt,
)

__all__ = [
    "Admitted",
    "EngineClient",
    "EngineOptions",
    "EngineReport",
    "EngineStats",
    "Event",
    "Failed",
    "Finished",
    "FrontModel",
    "Generation",
    "ModelInfo",
    "SamplingParams",
    "TextDelta",
    "TimingObserver",
    "TokenLogprob",
    "TopLogprob",
    "Usage",
    "VisionPrompt",
]
