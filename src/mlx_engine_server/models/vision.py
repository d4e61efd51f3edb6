"""Vision-language models through mlx-vlm: loaded once, then split into two jobs.

The images of a prompt go through the model's processor (which places the image tokens) and its
vision tower, giving the prompt's input embeddings; everything after that is a language model
decoding tokens, which the engine batches with every other request. `LanguageDecoder` is the
language model in the shape mlx-lm's BatchGenerator calls (tokens and a cache in, logits out).

Families whose positions depend on the images (M-RoPE: Qwen2-VL, Qwen2.5-VL, Qwen3-VL, GLM-4V)
carry a per-row position delta in the row's cache (see `mrope.py`). Families that attend to the
images through cross-attention at every decoding step (Llama 3.2 Vision, `mllama`) would need
the image states carried per row too; they are refused at start.
"""

from __future__ import annotations

import inspect
import logging
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
from .mrope import RowDeltas, decode_positions, is_mrope_language_model

logger = logging.getLogger(__name__)

# Families whose decoder needs per-request image state at every step: refused at start.
CROSS_ATTENTION_FAMILIES = frozenset({"mllama"})
# Named in every refusal: the families known not to be served (docs/vision.md says why).
NOT_SERVED = (
    "not served: Llama 3.2 Vision (mllama: cross-attention), LLaVA-Next (llava_next: image "
    "positions differ from its tokens in mlx-vlm); see docs/vision.md"
)
# What get_input_embeddings may return beside the embeddings, and what the prefill does with it.
PREFILL_EXTRAS = ("visual_pos_masks", "deepstack_visual_embeds")  # Qwen3-VL: early layers
POSITION_EXTRAS = ("position_ids", "rope_deltas")  # M-RoPE: kept by the prefill and the row
# Gemma 3's padding mask over one unpadded prompt: all ones, unused by mlx-vlm's generate too.
IGNORED_EXTRAS = ("attention_mask_4d",)
PROBE_MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]


def probe_image() -> Any:
    from PIL import Image  # noqa: PLC0415 - the processors take PIL images, as chat/media.py makes

    return Image.new("RGB", (64, 48), "gray")


def is_vision_config(config: dict[str, Any]) -> bool:
    return "vision_config" in config


class LanguageDecoder(Module):
    """A vision-language model's language model as mlx-lm sees a text model."""

    def __init__(self, vlm: Module) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.vlm = vlm  # held whole, so its parameters (vision tower too) count as the weights
        self.mrope = is_mrope_language_model(vlm.language_model)

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
        else:
            caches = [KVCache() for _ in self.layers]
        return [*caches, RowDeltas()] if self.mrope else caches

    def __call__(
        self,
        inputs: mx.array,
        cache: Any = None,
        inputs_embeds: mx.array | None = None,
        **extras: Any,
    ) -> mx.array:
        if self.mrope and cache is not None:
            *cache, rows = cache
            if "position_ids" not in extras:
                extras["position_ids"] = decode_positions(
                    cache[0].offset, rows.deltas, inputs.shape[1]
                )
        output = self.vlm.language_model(inputs, inputs_embeds=inputs_embeds, cache=cache, **extras)
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
    model_type = str(config.get("model_type", "unknown"))
    _check_family(model_type)  # before the weights are read
    try:
        vlm, processor = mlx_vlm_load(
            str(path), adapter_path=adapter_path, trust_remote_code=trust_remote_code
        )
    except (ValueError, FileNotFoundError, KeyError, OSError, ImportError) as exc:
        what = f"adapter {adapter_path} for {path}" if adapter_path else f"model {path}"
        raise StartupError(f"could not load the vision-language {what}: {exc}") from None
    tokenizer = _tokenizer(path, config, processor)
    parts = VisionParts(vlm, processor, LanguageDecoder(vlm), model_type)
    _check_positions_match_tokens(parts, tokenizer)
    return parts, tokenizer


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


def _check_family(model_type: str) -> None:
    if model_type in CROSS_ATTENTION_FAMILIES:
        raise StartupError(
            f"vision-language models of the {model_type!r} family are not supported: they "
            "attend to the image through cross-attention at every decoding step, and the "
            f"batching engine does not carry those image states per row ({NOT_SERVED})"
        )


def _check_positions_match_tokens(vision: VisionParts, tokenizer: TokenizerWrapper) -> None:
    """One small image through the processor and the vision tower: the embeddings must hold one
    position per prompt token, as the batch and the prefix cache count them. (mlx-vlm's
    LLaVA-Next merges a different number of image features than its processor placed image
    tokens.) Skipped when the probe itself cannot run: requests will say why."""
    try:
        text = tokenizer.apply_chat_template(
            PROBE_MESSAGES, tokenize=False, add_generation_prompt=True
        )
        prompt = prepare_vision_prompt(vision.processor, str(text), [probe_image()], "probe")
        positions = vision_input_embeddings(vision, prompt).embeddings.shape[1]
    except Exception as exc:  # any failure here is the request path's to report
        logger.warning("could not probe the %s family's image prompts: %s", vision.model_type, exc)
        return
    logger.debug("image prompt probe: %d tokens, %d positions", len(prompt.token_ids), positions)
    if positions != len(prompt.token_ids):
        raise StartupError(
            f"vision-language models of the {vision.model_type!r} family are not supported: "
            f"mlx-vlm's model merges the image into {positions} positions where its processor "
            f"placed {len(prompt.token_ids)} prompt tokens, so the prompt's positions cannot "
            f"be batched or cached by token ({NOT_SERVED})"
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
    inputs = processor(images=[images], text=[prompt_text], **_text_options(processor))
    arrays = {
        key: np.array(value)
        for key, value in inputs.items()
        if key not in ("input_ids", "attention_mask") and value is not None
    }
    token_ids = tuple(int(token) for token in np.array(inputs["input_ids"])[0])
    return VisionPrompt(token_ids, arrays, image_digest)


@dataclass(frozen=True)
class PromptFeatures:
    """What the prefill of a prompt with images feeds the language model."""

    embeddings: mx.array  # [1, tokens, hidden], image features merged in
    extras: dict[str, mx.array]  # per-prompt inputs of the prefill (Qwen3-VL's deepstack)
    positions: mx.array | None = None  # M-RoPE: [3, 1, tokens]
    rope_delta: int = 0  # M-RoPE: how far the text positions after the images run behind


def _text_options(processor: Any) -> dict[str, Any]:
    """No second BOS (the template wrote the prompt's), where the processor takes the option:
    some (LLaVA's) pass every keyword to their image processor too, which refuses it. mlx-vlm
    decides the same way."""
    parameters = inspect.signature(processor.__call__).parameters
    return {"add_special_tokens": False} if "add_special_tokens" in parameters else {}


def vision_input_embeddings(vision: VisionParts, prompt: VisionPrompt) -> PromptFeatures:
    """The prompt's input embeddings and what else its prefill needs."""
    input_ids = mx.array([prompt.token_ids])
    arrays = {key: mx.array(value) for key, value in prompt.arrays.items()}
    pixel_values = arrays.pop("pixel_values", None)
    mask = mx.ones(input_ids.shape, dtype=mx.int32)  # one unpadded prompt (Gemma 3 needs it)
    features = vision.model.get_input_embeddings(input_ids, pixel_values, mask=mask, **arrays)
    found = {
        key: value
        for key, value in features.to_dict().items()
        if key != "inputs_embeds" and value is not None
    }
    unsupported = [key for key in found if key not in (*PREFILL_EXTRAS, *POSITION_EXTRAS)]
    unsupported = [key for key in unsupported if key not in IGNORED_EXTRAS]
    if unsupported:
        raise ValueError(
            f"the {vision.model_type} family passes {', '.join(unsupported)} to its decoder, "
            "which the batching engine does not carry"
        )
    extras = {key: found[key] for key in PREFILL_EXTRAS if key in found}
    if not vision.decoder.mrope:
        return PromptFeatures(features.inputs_embeds, extras)
    positions, delta = _mrope_positions(vision, input_ids, arrays, found)
    return PromptFeatures(features.inputs_embeds, extras, positions, delta)


def _mrope_positions(
    vision: VisionParts, input_ids: mx.array, arrays: dict[str, mx.array], found: dict[str, Any]
) -> tuple[mx.array, int]:
    """The prompt's three-axis positions and its delta; GLM-4V leaves them to be computed."""
    positions, deltas = found.get("position_ids"), found.get("rope_deltas")
    if positions is None or deltas is None:
        positions, deltas = vision.model.language_model.get_rope_index(
            input_ids, arrays.get("image_grid_thw"), arrays.get("video_grid_thw"), None
        )
    return positions, int(deltas.reshape(-1)[0].item())
