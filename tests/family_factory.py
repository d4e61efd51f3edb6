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
