"""Vision-language models through mlx-vlm: loaded once, then split into two jobs.

The images of a prompt go through the model's processor (which places the image tokens) and its
vision tower, giving the prompt's input embeddings; everything after that is a language model
decoding tokens, which the engine batches with every other request. `LanguageDecoder` is the
language model in the shape mlx-lm's BatchGenerator calls (tokens and a cache in, logits out).

This holds for families whose decoder positions are plain token positions and whose images enter
only through the input embeddings (SmolVLM/Idefics3, LLaVA, ...). Families whose positions depend
on the images (Qwen2-VL's M-RoPE) or that attend to images through cross-attention (Llama 3.2
Vision) need per-request state while decoding; they are refused at start.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.nn.layers.base import Module
from mlx_lm.models.cache import KVCache
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.tokenizer_utils import load as load_tokenizer

from ..engine.messages import VisionPrompt
from ..errors import StartupError

# Decoder state that depends on the images: such families cannot decode in a shared batch.
PER_REQUEST_STATE = ("_rope_deltas", "_position_ids")
CROSS_ATTENTION_FAMILIES = frozenset({"mllama"})


def is_vision_config(config: dict[str, Any]) -> bool:
    return "vision_config" in config


class LanguageDecoder(Module):
    """A vision-language model's language model as mlx-lm sees a text model."""

    def __init__(self, vlm: Module) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.vlm = vlm  # held whole, so its parameters (vision tower too) count as the weights

    @property
    def layers(self) -> list[Any]:
        language_model = self.vlm.language_model
        inner = getattr(language_model, "model", language_model)
        layers: list[Any] = getattr(language_model, "layers", None) or inner.layers
        return layers

    def make_cache(self) -> list[Any]:
        language_model = self.vlm.language_model
        if hasattr(language_model, "make_cache"):
            caches: list[Any] = language_model.make_cache()
            return caches
        return [KVCache() for _ in self.layers]

    def __call__(
        self, inputs: mx.array, cache: Any = None, inputs_embeds: mx.array | None = None
    ) -> mx.array:
        output = self.vlm.language_model(inputs, inputs_embeds=inputs_embeds, cache=cache)
        logits: mx.array = output.logits
        return logits


@dataclass(frozen=True)
class VisionParts:
    model: Module  # the whole mlx-vlm model: vision tower, projector, language model
    processor: Any  # the model's processor: image preprocessing and image token placement
    decoder: LanguageDecoder
    model_type: str


def load_vision_model(
    path: Path, config: dict[str, Any], adapter_path: str | None, trust_remote_code: bool
) -> tuple[VisionParts, TokenizerWrapper]:
    try:
        from mlx_vlm.utils import load as mlx_vlm_load  # noqa: PLC0415 - only for vision models
    except ImportError:
        raise StartupError(
            f"{path} is a vision-language model, which needs mlx-vlm: "
            "pip install 'mlx-engine-server[vision]' (./run_server.sh installs it)"
        ) from None
    try:
        vlm, processor = mlx_vlm_load(
            str(path), adapter_path=adapter_path, trust_remote_code=trust_remote_code
        )
    except (ValueError, FileNotFoundError, KeyError, OSError, ImportError) as exc:
        what = f"adapter {adapter_path} for {path}" if adapter_path else f"model {path}"
        raise StartupError(f"could not load the vision-language {what}: {exc}") from None
    model_type = str(config.get("model_type", "unknown"))
    _check_family(vlm, model_type)
    tokenizer = _tokenizer(path, config, processor)
    return VisionParts(vlm, processor, LanguageDecoder(vlm), model_type), tokenizer


def load_vision_front(
    path: Path, config: dict[str, Any], trust_remote_code: bool
) -> tuple[Any, TokenizerWrapper]:
    """The processor and tokenizer alone, for the HTTP front: no weights."""
    from mlx_vlm.utils import (  # noqa: PLC0415 - only for vision models
        get_model_and_args,
        load_image_processor,
        load_processor,
    )

    # As mlx_vlm.utils.load builds it, less the weights. Importing the family's module first
    # installs its processor (SmolVLM's, for one, needs no torchvision then).
    get_model_and_args(config, path)
    options = {"trust_remote_code": trust_remote_code}
    eos_token_ids = config.get("eos_token_id")
    processor = load_processor(path, True, eos_token_ids=eos_token_ids, **options)
    image_processor = load_image_processor(path, **options)
    if image_processor is not None:
        processor.image_processor = image_processor
    return processor, _tokenizer(path, config, processor)


def _check_family(vlm: Module, model_type: str) -> None:
    language_model = vlm.language_model
    stateful = [name for name in PER_REQUEST_STATE if hasattr(language_model, name)]
    if stateful or model_type in CROSS_ATTENTION_FAMILIES:
        raise StartupError(
            f"vision-language models of the {model_type!r} family are not supported yet: their "
            "decoder keeps per-request image state (M-RoPE positions or cross-attention), which "
            "the batching engine does not carry"
        )


def _tokenizer(path: Path, config: dict[str, Any], processor: Any) -> TokenizerWrapper:
    """mlx-lm's tokenizer wrapper (streaming detokenizer, end tokens), with the processor's
    chat template when the tokenizer itself has none."""
    tokenizer = load_tokenizer(path, eos_token_ids=_eos_token_ids(config))
    template = getattr(processor, "chat_template", None)
    if template and not tokenizer._tokenizer.chat_template:
        tokenizer._tokenizer.chat_template = template
    return tokenizer


def _eos_token_ids(config: dict[str, Any]) -> list[int]:
    found: list[int] = []
    for section in (config, config.get("text_config") or {}):
        value = section.get("eos_token_id")
        found.extend([value] if isinstance(value, int) else list(value or []))
    return sorted(set(found))


def prepare_vision_prompt(
    processor: Any, prompt_text: str, images: list[Any], image_digest: str
) -> VisionPrompt:
    """Run the processor: it resizes the images and expands each image placeholder of the
    rendered prompt into the model's image tokens. Blocking; call it off the event loop."""
    inputs = processor(images=[images], text=[prompt_text], add_special_tokens=False)
    arrays = {
        key: np.array(value)
        for key, value in inputs.items()
        if key not in ("input_ids", "attention_mask") and value is not None
    }
    token_ids = tuple(int(token) for token in np.array(inputs["input_ids"])[0])
    return VisionPrompt(token_ids, arrays, image_digest)


def vision_input_embeddings(vision: VisionParts, prompt: VisionPrompt) -> mx.array:
    """The prompt's input embeddings, image features merged in: [1, tokens, hidden]."""
    input_ids = mx.array([prompt.token_ids])
    arrays = {key: mx.array(value) for key, value in prompt.arrays.items()}
    pixel_values = arrays.pop("pixel_values", None)
    features = vision.model.get_input_embeddings(input_ids, pixel_values, **arrays)
    extras = [
        key
        for key, value in features.to_dict().items()
        if key != "inputs_embeds" and value is not None
    ]
    if extras:
        raise ValueError(
            f"the {vision.model_type} family passes {', '.join(extras)} to its decoder, "
            "which the batching engine does not carry"
        )
    embeddings: mx.array = features.inputs_embeds
    return embeddings
