"""Tiny random-weight text models of mlx-lm families, one of each kind of layer cache.

Every model has SmolLM2's tokenizer, two to four layers of width 64, and projections scaled up
(`family_factory._livelier`) so that a wrong mask, position or recurrent state changes the greedy
tokens. Sliding windows are 16 positions: a chat prompt (SmolLM2's template adds a system
message) is longer, so the rotating caches wrap during the first prefill.
"""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from .family_factory import _livelier
from .model_factory import _tokenizer_files, _vocab_size

WINDOW = 16
SMALL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,  # --kv-bits quantizes heads in groups of 32
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
MOE = {"moe_intermediate_size": 32, "num_experts_per_tok": 2, "norm_topk_prob": True}


def _qwen3() -> dict[str, Any]:
    return {**SMALL, "num_hidden_layers": 2}


def _phi3() -> dict[str, Any]:
    """Its heads are hidden_size / heads wide: two heads of 32."""
    return {**SMALL, "num_hidden_layers": 2, "num_attention_heads": 2, "partial_rotary_factor": 0.5}


def _smollm3() -> dict[str, Any]:
    """Every second layer without RoPE."""
    return {**SMALL, "num_hidden_layers": 2, "no_rope_layer_interval": 2}


def _glm4() -> dict[str, Any]:
    return {
        **SMALL,
        "num_hidden_layers": 2,
        "attention_bias": True,
        "partial_rotary_factor": 0.5,
    }


def _qwen3_moe() -> dict[str, Any]:
    return {
        **SMALL,
        **MOE,
        "num_hidden_layers": 2,
        "num_experts": 4,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }


def _deepseek_v3() -> dict[str, Any]:
    """Multi-head latent attention and routed plus shared experts."""
    return {
        **SMALL,
        "num_hidden_layers": 2,
        "moe_intermediate_size": 32,
        "num_experts_per_tok": 2,
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "kv_lora_rank": 32,
        "q_lora_rank": 32,
        "qk_rope_head_dim": 32,
        "qk_nope_head_dim": 32,
        "v_head_dim": 32,
        "n_group": 1,
        "topk_group": 1,
    }


def _gemma3_text() -> dict[str, Any]:
    """Layer 0 slides over WINDOW positions, layer 1 sees everything."""
    return {
        **SMALL,
        "num_hidden_layers": 2,
        "query_pre_attn_scalar": 32,
        "sliding_window": WINDOW,
        "sliding_window_pattern": 2,
    }


def _ministral3() -> dict[str, Any]:
    return {
        **SMALL,
        "num_hidden_layers": 2,
        "layer_types": ["sliding_attention", "full_attention"],
        "sliding_window": WINDOW,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "llama_4_scaling_beta": 0.1,
            "original_max_position_embeddings": 64,
        },
    }


def _gpt_oss() -> dict[str, Any]:
    """Sliding and full layers, attention sinks, experts."""
    return {
        **SMALL,
        "num_hidden_layers": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": WINDOW,
        "layer_types": ["sliding_attention", "full_attention"],
    }


def _cohere2() -> dict[str, Any]:
    return {
        **SMALL,
        "num_hidden_layers": 2,
        "layer_norm_eps": 1e-5,
        "logit_scale": 1.0,
        "sliding_window": WINDOW,
        "sliding_window_pattern": 2,
    }


def _qwen3_next() -> dict[str, Any]:
    """Gated delta-net layers (an ArraysCache) and one attention layer; experts."""
    return {
        **SMALL,
        **MOE,
        "num_hidden_layers": 2,
        "full_attention_interval": 2,
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "num_experts": 4,
        "decoder_sparse_step": 1,
        "shared_expert_intermediate_size": 32,
        "mlp_only_layers": [],
        "partial_rotary_factor": 0.5,
    }


def _lfm2() -> dict[str, Any]:
    """Short convolutions (an ArraysCache) and one attention layer."""
    return {
        **SMALL,
        "num_hidden_layers": 2,
        "norm_eps": 1e-5,
        "conv_bias": False,
        "conv_L_cache": 3,
        "block_dim": 64,
        "block_ff_dim": 128,
        "block_multiple_of": 16,
        "block_ffn_dim_multiplier": 1.0,
        "block_auto_adjust_ff_dim": False,
        "layer_types": ["conv", "full_attention"],
    }


def _mamba2() -> dict[str, Any]:
    """Recurrent state only: no attention at all."""
    return {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_heads": 8,
        "head_dim": 16,
        "state_size": 16,
        "n_groups": 1,
        "conv_kernel": 4,
        "layer_norm_epsilon": 1e-5,
        "use_bias": False,
        "use_conv_bias": True,
        "tie_word_embeddings": False,
        "time_step_limit": [0.0, float("inf")],
        "time_step_rank": "auto",
    }


def _nemotron_h() -> dict[str, Any]:
    """Mamba 2 layers, an attention layer and an MLP layer."""
    return {
        **SMALL,
        "attention_bias": False,
        "mamba_num_heads": 8,
        "mamba_head_dim": 16,
        "mamba_proj_bias": False,
        "ssm_state_size": 16,
        "conv_kernel": 4,
        "n_groups": 1,
        "mlp_bias": False,
        "layer_norm_epsilon": 1e-5,
        "use_bias": False,
        "use_conv_bias": True,
        "hybrid_override_pattern": ["M", "*", "-"],
    }


def _jamba() -> dict[str, Any]:
    """Mamba (1) layers beside attention, experts every other layer."""
    return {
        **SMALL,
        "num_hidden_layers": 2,
        "attn_layer_offset": 1,
        "attn_layer_period": 2,
        "expert_layer_offset": 1,
        "expert_layer_period": 2,
        "mamba_d_conv": 4,
        "mamba_d_state": 16,
        "mamba_expand": 2,
        "num_experts": 4,
        "num_experts_per_tok": 2,
    }


def _mamba() -> dict[str, Any]:
    return {
        "hidden_size": 64,
        "intermediate_size": 128,
        "state_size": 16,
        "num_hidden_layers": 2,
        "conv_kernel": 4,
        "use_bias": False,
        "use_conv_bias": True,
        "time_step_rank": 8,
        "tie_word_embeddings": False,
    }


def _falcon_h1() -> dict[str, Any]:
    """Each layer is attention and Mamba 2 side by side: a CacheList of both caches."""
    return {
        **SMALL,
        "num_hidden_layers": 2,
        "mamba_d_conv": 4,
        "mamba_d_head": 16,
        "mamba_d_ssm": 64,
        "mamba_d_state": 16,
        "mamba_n_heads": 4,
        "mamba_chunk_size": 16,
        "rope_theta": 10000.0,
    }


def _llama4() -> dict[str, Any]:
    """Chunked attention in three layers of four (ChunkedKVCache), experts."""
    text = {
        **SMALL,
        "model_type": "llama4_text",
        "num_hidden_layers": 4,
        "attention_bias": False,
        "attention_chunk_size": 16,
        "interleave_moe_layer_step": 2,
        "intermediate_size_mlp": 128,
        "num_experts_per_tok": 1,
        "num_local_experts": 4,
        "rope_scaling": None,
        "use_qk_norm": True,
    }
    return {"text_config": text}


CONFIGS = {
    "qwen3": _qwen3,
    "phi3": _phi3,
    "smollm3": _smollm3,
    "glm4": _glm4,
    "qwen3_moe": _qwen3_moe,
    "deepseek_v3": _deepseek_v3,
    "gemma3_text": _gemma3_text,
    "ministral3": _ministral3,
    "gpt_oss": _gpt_oss,
    "cohere2": _cohere2,
    "qwen3_next": _qwen3_next,
    "lfm2": _lfm2,
    "mamba2": _mamba2,
    "nemotron_h": _nemotron_h,
    "jamba": _jamba,
    "mamba": _mamba,
    "falcon_h1": _falcon_h1,
    "llama4": _llama4,
}


def build_text_family(family: str, dest: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """`family`'s tiny model in `dest`: config.json, lively random weights, SmolLM2's tokenizer."""
    config = {"model_type": family, **CONFIGS[family](), "vocab_size": _vocab_size(tokenizer_dir)}
    if "text_config" in config:
        config["text_config"]["vocab_size"] = config["vocab_size"]
    module = importlib.import_module(f"mlx_lm.models.{family}")
    dest.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    weights = _livelier(dict(tree_flatten(model.parameters())))
    mx.save_safetensors(str(dest / "model.safetensors"), weights, {"format": "mlx"})
    (dest / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    for source in _tokenizer_files(tokenizer_dir):
        shutil.copy2(source, dest / source.name)
    return dest
