"""What each GGUF architecture is in mlx-lm: tensor names, config from metadata, norm convention.

llama.cpp's converters leave their marks on the weights: for the `llama` architecture they permute
Q and K for interleaved RoPE (so mlx-lm runs it with `rope_traditional`), and for Gemma they store
every RMSNorm weight as `1 + w` (mlx-lm's Gemma norms add the 1 themselves, so we take it off).
Mistral's text models are written as `llama`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import StartupError

Metadata = dict[str, Any]
Config = dict[str, Any]

TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_COMMON_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_GEMMA_NORMS = {
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_PHI3_FUSED = {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
# llama.cpp's rule for Gemma's attention scale: the 27B models use hidden / heads, others head_dim.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}
_GEMMA3_SLIDING_PATTERN = 6  # llama.cpp hard-codes it too: five local layers, then a global one
_GEMMA3_LOCAL_ROPE_BASE = 10000.0
# Llama 3.1 and 3.3 (factor 8) and 3.2 (factor 32) store their RoPE scaling only as the
# per-frequency factors it yields, in a `rope_freqs` tensor: we find which one it is.
ROPE_FREQS_TENSOR = "rope_freqs.weight"
# Phi-3's 128k variants (and Phi-3.5) store LongRoPE's factors as tensors too.
LONG_ROPE_TENSORS = {
    "long_factor": "rope_factors_long.weight",
    "short_factor": "rope_factors_short.weight",
}
CONFIG_TENSORS = (ROPE_FREQS_TENSOR, *LONG_ROPE_TENSORS.values())
_LLAMA3_ROPE_FACTORS = (8.0, 32.0, 16.0, 4.0)
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}
_LLAMA3_ORIGINAL_CONTEXT = 8192
_ROPE_FREQS_RTOL = 1e-3


@dataclass(frozen=True)
class Architecture:
    """One GGUF `general.architecture` and how it becomes an mlx-lm model."""

    name: str
    model_type: str
    block_names: Mapping[str, str]
    rope_traditional: bool = False
    norm_offset: float = 0.0  # what llama.cpp added to every `*norm.weight`
    extra_config: Callable[[Metadata, str], Config] = field(default=lambda metadata, arch: {})

    def mlx_name(self, gguf_name: str) -> str | None:
        """mlx-lm's name for a tensor, or None if the model has no place for it."""
        base, _, suffix = gguf_name.rpartition(".")
        if base in TOP_LEVEL_NAMES:
            return f"{TOP_LEVEL_NAMES[base]}.{suffix}"
        match base.split("."):
            case ["blk", layer, role] if role in self.block_names:
                return f"model.layers.{layer}.{self.block_names[role]}.{suffix}"
        return None


def scalar(metadata: Metadata, key: str, default: Any = None) -> Any:
    """One metadata value; a per-layer list (some files vary heads by layer) is refused."""
    value = metadata.get(key, default)
    if value is None:
        raise StartupError(f"GGUF metadata lacks {key!r}, needed to build the model config.")
    if isinstance(value, list):
        raise StartupError(f"GGUF metadata {key!r} is per-layer; only one value is supported.")
    return value


def _gemma_attention_scalar(metadata: Metadata, arch: str) -> int:
    """An int: transformers' Gemma configs (which the tokenizer loader reads) insist."""
    hidden = int(scalar(metadata, f"{arch}.embedding_length"))
    heads = int(scalar(metadata, f"{arch}.attention.head_count"))
    layers = int(scalar(metadata, f"{arch}.block_count"))
    if layers == _GEMMA_27B_LAYERS[arch]:
        return hidden // heads
    return int(scalar(metadata, f"{arch}.attention.key_length", hidden // heads))


def _phi3_config(metadata: Metadata, arch: str) -> Config:
    """Phi-4-mini (written as phi3) rotates only part of each head."""
    hidden = int(scalar(metadata, f"{arch}.embedding_length"))
    head_dim = hidden // int(scalar(metadata, f"{arch}.attention.head_count"))
    rotated = int(scalar(metadata, f"{arch}.rope.dimension_count", head_dim))
    return {"partial_rotary_factor": rotated / head_dim}


def _gemma2_config(metadata: Metadata, arch: str) -> Config:
    return {
        "query_pre_attn_scalar": _gemma_attention_scalar(metadata, arch),
        "attn_logit_softcapping": float(scalar(metadata, f"{arch}.attn_logit_softcapping", 50.0)),
        "final_logit_softcapping": float(scalar(metadata, f"{arch}.final_logit_softcapping", 30.0)),
    }


def _gemma3_config(metadata: Metadata, arch: str) -> Config:
    return {
        "query_pre_attn_scalar": _gemma_attention_scalar(metadata, arch),
        "sliding_window": int(scalar(metadata, f"{arch}.attention.sliding_window", 512)),
        "sliding_window_pattern": _GEMMA3_SLIDING_PATTERN,
        "rope_local_base_freq": _GEMMA3_LOCAL_ROPE_BASE,
    }


ARCHITECTURES = {
    arch.name: arch
    for arch in (
        Architecture("llama", "llama", _COMMON_BLOCK_NAMES, rope_traditional=True),
        Architecture("qwen2", "qwen2", _COMMON_BLOCK_NAMES),
        Architecture("qwen3", "qwen3", {**_COMMON_BLOCK_NAMES, **_QK_NORMS}),
        Architecture(
            "gemma2",
            "gemma2",
            {**_COMMON_BLOCK_NAMES, **_GEMMA_NORMS},
            norm_offset=1.0,
            extra_config=_gemma2_config,
        ),
        Architecture(
            "gemma3",
            "gemma3_text",
            {**_COMMON_BLOCK_NAMES, **_GEMMA_NORMS, **_QK_NORMS},
            norm_offset=1.0,
            extra_config=_gemma3_config,
        ),
        Architecture(
            "phi3", "phi3", {**_COMMON_BLOCK_NAMES, **_PHI3_FUSED}, extra_config=_phi3_config
        ),
    )
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


def architecture_of(metadata: Metadata, file_name: str) -> Architecture:
    name = metadata.get("general.architecture")
    if name not in ARCHITECTURES:
        raise StartupError(
            f"{file_name}: GGUF architecture {name!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    return ARCHITECTURES[name]


def model_config(
    arch: Architecture,
    metadata: Metadata,
    has_lm_head: bool,
    rope_tensors: Mapping[str, Sequence[float]] | None = None,
) -> Config:
    """mlx-lm's `config.json` for the model, from the file's metadata and `CONFIG_TENSORS`."""
    rope_tensors = rope_tensors or {}
    key = arch.name
    heads = int(scalar(metadata, f"{key}.attention.head_count"))
    hidden = int(scalar(metadata, f"{key}.embedding_length"))
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    config: Config = {
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "num_hidden_layers": int(scalar(metadata, f"{key}.block_count")),
        "intermediate_size": int(scalar(metadata, f"{key}.feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(scalar(metadata, f"{key}.attention.head_count_kv", heads)),
        "head_dim": int(scalar(metadata, f"{key}.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(scalar(metadata, f"{key}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(scalar(metadata, f"{key}.rope.freq_base", 10000.0)),
        "rope_traditional": arch.rope_traditional,
        "max_position_embeddings": int(scalar(metadata, f"{key}.context_length", 2048)),
        "vocab_size": int(scalar(metadata, f"{key}.vocab_size", len(tokens))),
        "tie_word_embeddings": not has_lm_head,
        "rope_scaling": _rope_scaling(metadata, key, rope_tensors),
        **arch.extra_config(metadata, key),
    }
    if LONG_ROPE_TENSORS["long_factor"] in rope_tensors:
        config["original_max_position_embeddings"] = int(
            scalar(metadata, f"{key}.rope.scaling.original_context_length")
        )
    for name in ("bos_token_id", "eos_token_id"):
        if f"tokenizer.ggml.{name}" in metadata:
            config[name] = int(scalar(metadata, f"tokenizer.ggml.{name}"))
    return config


def _rope_scaling(
    metadata: Metadata, arch: str, rope_tensors: Mapping[str, Sequence[float]]
) -> Config | None:
    if ROPE_FREQS_TENSOR in rope_tensors:
        return _llama3_rope_scaling(metadata, arch, rope_tensors[ROPE_FREQS_TENSOR])
    if all(name in rope_tensors for name in LONG_ROPE_TENSORS.values()):
        factors = {key: list(rope_tensors[name]) for key, name in LONG_ROPE_TENSORS.items()}
        return {"type": "longrope", **factors}
    kind = metadata.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    factor = float(scalar(metadata, f"{arch}.rope.scaling.factor"))
    if kind == "linear":
        return {"type": "linear", "factor": factor}
    if kind == "yarn":  # Qwen2.5's and Qwen3's long-context files
        original = int(scalar(metadata, f"{arch}.rope.scaling.original_context_length"))
        return {"type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    raise StartupError(f"GGUF RoPE scaling {kind!r} is not supported (only 'linear' and 'yarn').")


def llama3_rope_factors(factor: float, base: float, dims: int) -> list[float]:
    """The factors llama.cpp's converter writes to `rope_freqs` for Llama 3's RoPE scaling."""
    low, high = _LLAMA3_ROPE["low_freq_factor"], _LLAMA3_ROPE["high_freq_factor"]
    low_wavelen, high_wavelen = _LLAMA3_ORIGINAL_CONTEXT / low, _LLAMA3_ORIGINAL_CONTEXT / high
    factors = []
    for i in range(0, dims, 2):
        wavelen = 2 * math.pi * base ** (i / dims)
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (_LLAMA3_ORIGINAL_CONTEXT / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors


def _llama3_rope_scaling(metadata: Metadata, arch: str, rope_freqs: Sequence[float]) -> Config:
    hidden = int(scalar(metadata, f"{arch}.embedding_length"))
    heads = int(scalar(metadata, f"{arch}.attention.head_count"))
    dims = int(scalar(metadata, f"{arch}.rope.dimension_count", hidden // heads))
    base = float(scalar(metadata, f"{arch}.rope.freq_base", 10000.0))
    for factor in _LLAMA3_ROPE_FACTORS:
        expected = llama3_rope_factors(factor, base, dims)
        if len(expected) == len(rope_freqs) and all(
            math.isclose(a, b, rel_tol=_ROPE_FREQS_RTOL)
            for a, b in zip(expected, rope_freqs, strict=True)
        ):
            return {
                "rope_type": "llama3",
                "factor": factor,
                **_LLAMA3_ROPE,
                "original_max_position_embeddings": _LLAMA3_ORIGINAL_CONTEXT,
            }
    raise StartupError(
        f"GGUF tensor {ROPE_FREQS_TENSOR!r} matches no Llama 3 RoPE scaling "
        f"(factor {', '.join(str(f) for f in _LLAMA3_ROPE_FACTORS)}); this RoPE is not supported."
    )
