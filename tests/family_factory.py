"""Tiny random-weight models of the families people run, written offline.

Text families are mlx-lm models with SmolLM2's tokenizer. Vision families are mlx-vlm models
whose language model takes SmolLM2's vocabulary plus the family's image tokens, with the
family's own transformers processor (the PIL image processors: no torch, no network), tiny
images and a few image tokens each.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from .model_factory import _tokenizer_files, _vocab_size


def build_tiny_gemma2(dest: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """Gemma 2 with shared KV heads (4 query heads over 2): the shape of mlx-lm's batch fault."""
    from mlx_lm.models import gemma2

    config = {
        "model_type": "gemma2",
        "architectures": ["Gemma2ForCausalLM"],
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "vocab_size": _vocab_size(tokenizer_dir),
        "max_position_embeddings": 512,
        "query_pre_attn_scalar": 16,
    }
    return _write_text_model(dest, tokenizer_dir, config, gemma2, seed)


def _write_text_model(
    dest: Path, tokenizer_dir: Path, config: dict[str, Any], family: Any, seed: int
) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    model = family.Model(family.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(dest / "model.safetensors"), weights, {"format": "mlx"})
    (dest / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    for source in _tokenizer_files(tokenizer_dir):
        shutil.copy2(source, dest / source.name)
    return dest


# --- vision families ------------------------------------------------------------------------

TINY_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 1024,
}


def _tokenizer_with(tokenizer_dir: Path, tokens: list[str], template: str) -> Any:
    """SmolLM2's tokenizer with the family's image tokens added, and the family's template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    tokenizer.chat_template = template
    return tokenizer


def _write_vision_model(
    dest: Path, config: dict[str, Any], tokenizer: Any, preprocessor: dict[str, Any], seed: int
) -> Path:
    """Config, random weights as mlx-vlm builds the model, tokenizer and processor files."""
    import copy

    from mlx_vlm.utils import get_model_and_args, update_module_configs

    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    model_class, _ = get_model_and_args(config=copy.deepcopy(config), model_path=dest)
    shaped = copy.deepcopy(config)
    model_config = model_class.ModelConfig.from_dict(shaped)
    model_config = update_module_configs(model_config, model_class, shaped, ["text", "vision"])
    mx.random.seed(seed)
    model = model_class.Model(model_config)
    weights = _livelier(dict(tree_flatten(model.parameters())))
    mx.save_safetensors(str(dest / "model.safetensors"), weights, {"format": "mlx"})
    tokenizer.save_pretrained(dest)
    (dest / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")
    (dest / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return dest


LIVELY_SCALE = 4.0


def _livelier(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Projections scaled up from their tiny initial range, so attention (and so every position
    and mask) changes the greedy tokens: a wrong position shows as a wrong token."""
    lively = {
        name: value * LIVELY_SCALE if name.endswith("proj.weight") else value
        for name, value in weights.items()
    }
    for name, value in weights.items():
        if name.endswith("mm_input_projection_weight"):  # Gemma 3 starts it at ones
            lively[name] = mx.random.normal(value.shape) * value.shape[0] ** -0.5
    return lively


QWEN_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# 8 px patches merged 2 x 2: a 16 px cell per image token, at most 4 x 4 of them per image.
QWEN_PREPROCESSOR = {
    "patch_size": 8,
    "merge_size": 2,
    "temporal_patch_size": 2,
    "size": {"shortest_edge": 16 * 16, "longest_edge": 64 * 64},
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}


def _qwen_config(model_type: str, tokenizer: Any, vision: dict[str, Any]) -> dict[str, Any]:
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_TOKENS}
    return {
        "model_type": model_type,
        "vocab_size": len(tokenizer),
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "eos_token_id": tokenizer.eos_token_id,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        **TINY_TEXT,
        "vision_config": {"model_type": model_type, **vision},
    }


def build_tiny_qwen2_vl(dest: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    tokenizer = _tokenizer_with(tokenizer_dir, QWEN_TOKENS, QWEN_TEMPLATE)
    vision = {
        "depth": 1,
        "embed_dim": 32,
        "hidden_size": 64,
        "num_heads": 2,
        "patch_size": 8,
        "spatial_patch_size": 8,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    config = _qwen_config("qwen2_vl", tokenizer, vision)
    return _write_vision_model(dest, config, tokenizer, QWEN_PREPROCESSOR, seed)


def build_tiny_qwen2_5_vl(dest: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    tokenizer = _tokenizer_with(tokenizer_dir, QWEN_TOKENS, QWEN_TEMPLATE)
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "out_hidden_size": 64,
        "num_heads": 2,
        "patch_size": 8,
        "spatial_patch_size": 8,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 32,  # windows of 2 x 2 image tokens
        "fullatt_block_indexes": [1],
    }
    config = _qwen_config("qwen2_5_vl", tokenizer, vision)
    return _write_vision_model(dest, config, tokenizer, QWEN_PREPROCESSOR, seed)


def build_tiny_qwen3_vl(dest: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """With a deepstack layer: image features also enter the first decoder layer."""
    tokenizer = _tokenizer_with(tokenizer_dir, QWEN_TOKENS, QWEN_TEMPLATE)
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "out_hidden_size": 64,
        "num_heads": 2,
        "patch_size": 8,
        "spatial_patch_size": 8,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0],
    }
    config = _qwen_config("qwen3_vl", tokenizer, vision)
    text = {key: value for key, value in config.items() if key != "vision_config"}
    text.update(head_dim=16, rope_scaling={"type": "default", "mrope_section": [2, 3, 3]})
    config["text_config"] = text
    return _write_vision_model(dest, config, tokenizer, QWEN_PREPROCESSOR, seed)


GEMMA3_TOKENS = {
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
}
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<start_of_image>{% endif %}{% endfor %}{% endif %}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
GEMMA3_IMAGE_TOKENS = 4  # 32 px images, 8 px patches (4 x 4) pooled to 2 x 2


def build_tiny_gemma3(dest: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    tokenizer = _tokenizer_with(tokenizer_dir, list(GEMMA3_TOKENS.values()), GEMMA3_TEMPLATE)
    text = {
        "model_type": "gemma3_text",
        **TINY_TEXT,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 64,  # every other layer slides: a second turn passes the window
        "sliding_window_pattern": 2,
        "mm_tokens_per_image": GEMMA3_IMAGE_TOKENS,
        "vocab_size": len(tokenizer),
    }
    config = {
        "model_type": "gemma3",
        "vocab_size": len(tokenizer),
        "hidden_size": text["hidden_size"],
        "image_token_index": tokenizer.convert_tokens_to_ids(GEMMA3_TOKENS["image_token"]),
        "mm_tokens_per_image": GEMMA3_IMAGE_TOKENS,
        "eos_token_id": tokenizer.eos_token_id,
        "text_config": text,
        "vision_config": _siglip(image_size=32),
    }
    preprocessor = {
        "image_processor_type": "Gemma3ImageProcessor",
        "processor_class": "Gemma3Processor",
        "size": {"height": 32, "width": 32},
        "do_pan_and_scan": False,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    dest = _write_vision_model(dest, config, tokenizer, preprocessor, seed)
    _name_tokens(dest, GEMMA3_TOKENS)
    processor_config = {"processor_class": "Gemma3Processor", "image_seq_length": 4}
    (dest / "processor_config.json").write_text(json.dumps(processor_config), encoding="utf-8")
    return dest


def _siglip(image_size: int, patch_size: int = 8) -> dict[str, Any]:
    return {
        "model_type": "siglip_vision_model",
        "num_hidden_layers": 1,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "patch_size": patch_size,
        "image_size": image_size,
    }


def _name_tokens(dest: Path, named: dict[str, str]) -> None:
    """The processor finds the family's tokens by name on the tokenizer (`image_token`...)."""
    path = dest / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["extra_special_tokens"] = named
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")


LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _llava_config(model_type: str, tokenizer: Any, image_size: int) -> dict[str, Any]:
    return {
        "model_type": model_type,
        "vocab_size": len(tokenizer),
        "image_token_index": tokenizer.convert_tokens_to_ids("<image>"),
        "vision_feature_select_strategy": "default",
        "vision_feature_layer": -1,
        "eos_token_id": tokenizer.eos_token_id,
        "text_config": {"model_type": "llama", **TINY_TEXT, "vocab_size": len(tokenizer)},
        "vision_config": {
            "model_type": "clip_vision_model",
            "num_hidden_layers": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": 8,
            "projection_dim": 32,
        },
    }


def _clip_preprocessor(image_size: int) -> dict[str, Any]:
    return {
        "image_processor_type": "CLIPImageProcessor",
        "size": {"shortest_edge": image_size},
        "crop_size": {"height": image_size, "width": image_size},
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }


def build_tiny_llava(dest: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """24 px images in 8 px patches: 9 image tokens."""
    tokenizer = _tokenizer_with(tokenizer_dir, ["<image>"], LLAVA_TEMPLATE)
    config = _llava_config("llava", tokenizer, image_size=24)
    dest = _write_vision_model(dest, config, tokenizer, _clip_preprocessor(24), seed)
    processor = {
        "processor_class": "LlavaProcessor",
        "patch_size": 8,
        "vision_feature_select_strategy": "default",
        "image_token": "<image>",
        "num_additional_image_tokens": 1,
    }
    (dest / "processor_config.json").write_text(json.dumps(processor), encoding="utf-8")
    return dest


def build_tiny_llava_next(dest: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """LLaVA-Next: the image in 24 px tiles on a grid of pinpoints, plus a global view."""
    tokenizer = _tokenizer_with(tokenizer_dir, ["<image>"], LLAVA_TEMPLATE)
    config = _llava_config("llava_next", tokenizer, image_size=24)
    pinpoints = [[24, 48], [48, 24], [48, 48]]
    config["image_grid_pinpoints"] = pinpoints
    preprocessor = {
        **_clip_preprocessor(24),
        "image_processor_type": "LlavaNextImageProcessor",
        "image_grid_pinpoints": pinpoints,
    }
    dest = _write_vision_model(dest, config, tokenizer, preprocessor, seed)
    processor = {
        "processor_class": "LlavaNextProcessor",
        "patch_size": 8,
        "vision_feature_select_strategy": "default",
        "image_token": "<image>",
        "num_additional_image_tokens": 1,
    }
    (dest / "processor_config.json").write_text(json.dumps(processor), encoding="utf-8")
    return dest


PIXTRAL_TOKENS = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]
MISTRAL3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST]{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}[IMG]{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %}[/INST]{% else %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


def build_tiny_mistral3(dest: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """Mistral 3 (a Pixtral vision tower): 8 px patches merged 2 x 2, rows ended by a break."""
    tokenizer = _tokenizer_with(tokenizer_dir, PIXTRAL_TOKENS, MISTRAL3_TEMPLATE)
    config = {
        "model_type": "mistral3",
        "vocab_size": len(tokenizer),
        "image_token_index": tokenizer.convert_tokens_to_ids("[IMG]"),
        "spatial_merge_size": 2,
        "vision_feature_layer": -1,
        "eos_token_id": tokenizer.eos_token_id,
        "text_config": {
            "model_type": "mistral",
            **TINY_TEXT,
            "head_dim": 16,
            "rope_theta": 10000.0,
            "vocab_size": len(tokenizer),
        },
        "vision_config": {
            "model_type": "pixtral",
            "num_hidden_layers": 1,
            "hidden_size": 32,
            "head_dim": 16,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "image_size": 64,
            "patch_size": 8,
        },
    }
    preprocessor = {
        "image_processor_type": "PixtralImageProcessor",
        "patch_size": {"height": 8, "width": 8},
        "size": {"longest_edge": 64},
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    dest = _write_vision_model(dest, config, tokenizer, preprocessor, seed)
    processor = {"processor_class": "PixtralProcessor", "patch_size": 8, "spatial_merge_size": 2}
    (dest / "processor_config.json").write_text(json.dumps(processor), encoding="utf-8")
    return dest


GLM4V_TOKENS = ["<|begin_of_image|>", "<|end_of_image|>", "<|image|>", "<|video|>"]
GLM4V_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tiny_glm4v(dest: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """GLM-4V: M-RoPE over half of each head, a Qwen-style vision tower."""
    tokenizer = _tokenizer_with(tokenizer_dir, GLM4V_TOKENS, GLM4V_TEMPLATE)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in GLM4V_TOKENS}
    text = {
        "model_type": "glm4v_text",
        **TINY_TEXT,
        "vocab_size": len(tokenizer),
        "eos_token_id": [tokenizer.eos_token_id],
        "partial_rotary_factor": 0.5,
        "rope_scaling": {"rope_type": "default", "mrope_section": [2, 1, 1]},
        "pad_token_id": 0,
    }
    config = {
        "model_type": "glm4v",
        "vocab_size": len(tokenizer),
        "hidden_size": text["hidden_size"],
        "image_token_index": ids["<|image|>"],
        "image_token_id": ids["<|image|>"],
        "video_token_index": ids["<|video|>"],
        "video_token_id": ids["<|video|>"],
        "vision_start_token_id": ids["<|begin_of_image|>"],
        "vision_end_token_id": ids["<|end_of_image|>"],
        "eos_token_id": [tokenizer.eos_token_id],
        "text_config": text,
        "vision_config": {
            "model_type": "glm4v",
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "patch_size": 8,
            "image_size": 32,
            "out_hidden_size": 64,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
    }
    preprocessor = {
        "image_processor_type": "Glm4vImageProcessor",
        "patch_size": 8,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "size": {"shortest_edge": 16 * 16, "longest_edge": 64 * 64},
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    }
    dest = _write_vision_model(dest, config, tokenizer, preprocessor, seed)
    _name_tokens(dest, {"image_token": "<|image|>"})
    return dest
