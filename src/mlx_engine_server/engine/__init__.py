"""The generation engine: one worker thread owns MLX and steps every live request as one batch."""

from .engine import Engine, Generation
from .messages import (
    Admitted,
    EngineOptions,
    EngineStats,
    Event,
    Failed,
    Finished,
    SamplingParams,
    TextDelta,
    TokenLogprob,
    TopLogprob,
    Usage,
)

__all__ = [
    "Admitted",
    "Engine",
    "EngineOptions",
    "EngineStats",
    "Event",
    "Failed",
    "Finished",
    "Generation",
    "SamplingParams",
    "TextDelta",
    "TokenLogprob",
    "TopLogprob",
    "Usage",
]
