"""What the front needs of the model, made from the parts models/ loads: the tokenizer, and for
a vision model a function that runs its processor over a prompt's images."""

from __future__ import annotations

import functools
from pathlib import Path

from ..models.loader import FrontParts, LoadedModel, load_front
from ..models.vision import prepare_vision_prompt
from .client import FrontModel
from .messages import ModelInfo


def front_model(parts: FrontParts) -> FrontModel:
    processor = parts.processor
    if processor is None:
        return FrontModel(parts.tokenizer)
    return FrontModel(parts.tokenizer, functools.partial(prepare_vision_prompt, processor))


def load_front_model(info: ModelInfo, trust_remote_code: bool) -> FrontModel:
    """The front's own tokenizer and processor, from the directory the engine resolved."""
    return front_model(load_front(Path(info.resolved_path), trust_remote_code))


def shared_front_model(loaded: LoadedModel) -> FrontModel:
    """In one process: the worker's tokenizer and processor serve the front too."""
    processor = loaded.vision.processor if loaded.vision is not None else None
    return front_model(FrontParts(loaded.tokenizer, processor))
