"""A tiny random-weight vision-language model of a real mlx-vlm family, written offline.

The family is SmolVLM (mlx-vlm's `smolvlm`, Idefics3's layout): a SigLIP vision tower, a pixel
shuffle connector and a llama decoder. Its processor (mlx-vlm's SmolVLMProcessor with
transformers' PIL image processor) runs from local files without torch or network, and the
decoder is a plain llama, so SmolLM2's tokenizer serves with SmolVLM's image tokens added.
Images are split into tiles of 32 px (up to 2 x 2 plus a global view), 4 tokens each.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from .model_factory import _vocab_size

IMAGE_SIZE = 32  # the vision tower's input, and the tile size of split images
LONGEST_EDGE = 64  # images are resized so the longest edge is this: at most 2 x 2 tiles
IMAGE_SEQ_LEN = 4  # (32 / 8 patches)^2 / scale_factor^2
IMAGE_TOKENS = [
    "<fake_token_around_image>",
    "<image>",
    "<end_of_utterance>",
    "<global-img>",
    *(f"<row_{row}_col_{col}>" for row in (1, 2) for col in (1, 2)),
]

# SmolVLM's own chat template (content as a list of text and image parts).
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_tiny_smolvlm(dest: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """A SmolVLM directory as mlx-vlm loads it: config, weights, tokenizer, processor files."""
    from mlx_vlm.models import smolvlm

    dest.mkdir(parents=True, exist_ok=True)
    image_token_ids = _write_tokenizer(dest, tokenizer_dir)
    config = _config(_vocab_size(dest), image_token_ids["<image>"])
    config["eos_token_id"] = image_token_ids["<end_of_utterance>"]
    (dest / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    model_config = smolvlm.ModelConfig.from_dict(config)
    model_config.text_config = smolvlm.TextConfig.from_dict(config["text_config"])
    model_config.vision_config = smolvlm.VisionConfig.from_dict(config["vision_config"])
    mx.random.seed(seed)
    model = smolvlm.Model(model_config)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(dest / "model.safetensors"), weights, {"format": "mlx"})
    _write_processor_files(dest)
    return dest


def _config(vocab_size: int, image_token_id: int) -> dict[str, Any]:
    return {
        "model_type": "smolvlm",
        "architectures": ["SmolVLMForConditionalGeneration"],
        "image_token_id": image_token_id,
        "scale_factor": 2,
        "vocab_size": vocab_size,
        "text_config": {
            "model_type": "llama",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_hidden_layers": 2,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "vocab_size": vocab_size,
            "max_position_embeddings": 512,
        },
        "vision_config": {
            "model_type": "smolvlm_vision",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "num_hidden_layers": 1,
            "patch_size": 8,
            "image_size": IMAGE_SIZE,
        },
    }


def _write_tokenizer(dest: Path, tokenizer_dir: Path) -> dict[str, int]:
    """SmolLM2's tokenizer with SmolVLM's image tokens added as special tokens."""
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    next_id = _vocab_size(tokenizer_dir)
    ids = {}
    for offset, content in enumerate(IMAGE_TOKENS):
        ids[content] = next_id + offset
        spec["added_tokens"].append(
            {
                "id": next_id + offset,
                "content": content,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        )
    (dest / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = SMOLVLM_TEMPLATE
    config["end_of_utterance_token"] = "<end_of_utterance>"  # noqa: S105 - a token, no secret
    config["image_token"] = "<image>"  # noqa: S105 - a token of the vocabulary, not a secret
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    for extra in ("special_tokens_map.json",):
        if (tokenizer_dir / extra).is_file():
            shutil.copy2(tokenizer_dir / extra, dest / extra)
    (dest / "chat_template.jinja").write_text(SMOLVLM_TEMPLATE, encoding="utf-8")
    return ids


def _write_processor_files(dest: Path) -> None:
    preprocessor = {
        "image_processor_type": "SmolVLMImageProcessor",
        "processor_class": "SmolVLMProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"longest_edge": LONGEST_EDGE},
        "max_image_size": {"longest_edge": IMAGE_SIZE},
        "do_image_splitting": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_pad": True,
        "resample": 1,
    }
    (dest / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    processor = {"processor_class": "SmolVLMProcessor", "image_seq_len": IMAGE_SEQ_LEN}
    (dest / "processor_config.json").write_text(json.dumps(processor, indent=2))
