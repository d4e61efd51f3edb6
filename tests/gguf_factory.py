"""Small GGUF files written offline: K-quant blocks in ggml's layout, and tiny models of each
architecture the converter supports.

gguf-py writes the container and quantizes Q4_0, Q4_1 and Q8_0, but not the K-quants: those
blocks are packed here from their fields (super-block scales, 6-bit sub-block scales and mins,
quants), with a simple quantizer (not llama.cpp's search, which only makes the error smaller).
`quantize` returns the bytes and the weights they mean, computed from the fields in gguf-py's
order of operations; the tests check that gguf-py decodes the bytes to exactly those weights.
A little over 400 lines: the block writers, the tiny models and their mlx-lm counterparts are
one fixture, and the tests and benchmarks/gguf_requantize.py use all three together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as QType
from gguf import GGUFWriter, quants

QK_K = 256
_K_SUB = {QType.Q4_K: 15, QType.Q5_K: 31}  # largest quant of the affine K types


def quantize(weights: np.ndarray, qtype: QType) -> tuple[np.ndarray, np.ndarray]:
    """`(bytes as uint8 rows, the float32 weights they encode)` for a 2-D float array."""
    rows = weights.shape[0]
    if qtype in _K_SUB:
        raw, meant = _affine_k(weights.reshape(-1, 8, 32).astype(np.float32), qtype)
    elif qtype == QType.Q6_K:
        raw, meant = _q6_k(weights.reshape(-1, 16, 16).astype(np.float32))
    elif qtype in (QType.F32, QType.F16):
        raw = weights.astype(np.float32 if qtype == QType.F32 else np.float16)
        return raw, raw.astype(np.float32)
    else:
        raw = quants.quantize(weights.astype(np.float32), qtype)
        return raw, quants.dequantize(raw, qtype)
    return raw.reshape(rows, -1), meant.reshape(weights.shape)


def _f16(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16)


def _affine_k(x: np.ndarray, qtype: QType) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K or Q5_K: w = d * sc * q - dmin * m for each 32 weights of a 256-weight block."""
    top = _K_SUB[qtype]
    low = np.minimum(x.min(-1), 0.0)
    scale = (x.max(-1) - low) / top
    d = _f16(np.maximum(scale.max(-1), 1e-8) / 63)
    dmin = _f16(np.maximum(-low.max(-1, initial=0.0), -low.min(-1)) / 63 + 1e-8)
    sc = np.clip(np.rint(scale / d.astype(np.float32)[:, None]), 1, 63).astype(np.uint8)
    m = np.clip(np.rint(-low / dmin.astype(np.float32)[:, None]), 0, 63).astype(np.uint8)
    step = (d.astype(np.float32)[:, None] * sc)[..., None]
    offset = (dmin.astype(np.float32)[:, None] * m)[..., None]
    q = np.clip(np.rint((x + offset) / step), 0, top).astype(np.uint8)
    meant = step * q.astype(np.float32) - offset
    parts = [d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2)]
    parts.append(_pack_k_scales(sc, m))
    if qtype == QType.Q5_K:
        high = (q >> 4) & 1  # (blocks, 8 sub-blocks, 32): bit j of byte l is sub-block j's
        parts.append((high << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1, dtype=np.uint8))
    nibbles = (q & 0x0F).reshape(-1, 4, 2, 32)
    parts.append((nibbles[:, :, 0] | (nibbles[:, :, 1] << 4)).reshape(-1, 128))
    return np.concatenate(parts, axis=-1), meant


def _pack_k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """ggml's 12 bytes for eight 6-bit scales and eight 6-bit mins (`get_scale_min_k4`)."""
    low = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    high = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return np.concatenate([low, mid, high], axis=-1).astype(np.uint8)


def _q6_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q6_K: w = d * sc * (q - 32) for each 16 weights, sc a signed byte."""
    scale = np.abs(x).max(-1) / 31
    d = _f16(np.maximum(scale.max(-1), 1e-8) / 127)
    sc = np.clip(np.rint(scale / d.astype(np.float32)[:, None]), 1, 127).astype(np.int8)
    step = (d.astype(np.float32)[:, None] * sc.astype(np.float32))[..., None]
    q = np.clip(np.rint(x / step), -32, 31).astype(np.int8)
    meant = (step * q.astype(np.float32)).reshape(-1, QK_K)
    u = (q.astype(np.int16) + 32).astype(np.uint8).reshape(-1, 2, 128)  # two halves of 128
    low, high = u & 0x0F, u >> 4
    ql = (low[:, :, :64] | (low[:, :, 64:] << 4)).reshape(-1, 128)
    hq = high.reshape(-1, 2, 4, 32)
    qh = (hq[:, :, 0] | (hq[:, :, 1] << 2) | (hq[:, :, 2] << 4) | (hq[:, :, 3] << 6)).reshape(
        -1, 64
    )
    parts = [ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)]
    return np.concatenate(parts, axis=-1), meant


# A byte-level BPE vocabulary of printable ASCII (every token decodes to text), ChatML specials.
_BYTE_LEVEL_SPACE = "\u0120"
_WORDS = ("hi", "Paris", "the", "capital")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def byte_level_vocabulary() -> tuple[list[str], list[str], list[int]]:
    """`(tokens, merges, token types)`: specials, printable ASCII, and a few merged words."""
    chars = [_BYTE_LEVEL_SPACE if c == " " else c for c in map(chr, range(33, 127))]
    chars.insert(0, _BYTE_LEVEL_SPACE)
    chars.append("\u010a")  # "\n" in byte-level spelling
    merges: list[str] = []
    words: list[str] = []
    for word in _WORDS:
        spelled = _BYTE_LEVEL_SPACE + word
        for end in range(2, len(spelled) + 1):
            merges.append(f"{spelled[: end - 1]} {spelled[end - 1]}")
            words.append(spelled[:end])
    tokens = list(SPECIALS) + chars + words
    types = [3] * len(SPECIALS) + [1] * (len(chars) + len(words))
    return tokens, merges, types


@dataclass(frozen=True)
class TinyGGUF:
    """A written file and the float32 weights its tensors mean, under their GGUF names."""

    path: Path
    meant: dict[str, np.ndarray]
    qtypes: dict[str, QType]


def write_gguf(
    path: Path, arch: str, metadata: dict[str, Any], tensors: dict[str, tuple[np.ndarray, QType]]
) -> TinyGGUF:
    """Write `tensors` (float weights and the type to store them in) with `metadata`."""
    writer = GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        _add_value(writer, key, value)
    meant: dict[str, np.ndarray] = {}
    for name, (weights, qtype) in tensors.items():
        raw, meant[name] = quantize(weights, qtype)
        raw_dtype = None if qtype in (QType.F32, QType.F16) else qtype
        writer.add_tensor(name, raw, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return TinyGGUF(path, meant, {name: qtype for name, (_, qtype) in tensors.items()})


def _add_value(writer: GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, value)


# Tiny models of each architecture: hidden size 256 (one K-quant block a row).
HIDDEN = 256
HEADS = 2
KV_HEADS = 1
HEAD_DIM = 128
FFN = 256
CONTEXT = 256
# Which GGUF types a file of each scheme stores its matrices in, as llama.cpp's mixes do:
# the "_M" mixes keep V, the FFN down projection and the embeddings at 6 bits.
SCHEMES = {
    "Q4_K_M": (QType.Q4_K, QType.Q6_K),
    "Q5_K_M": (QType.Q5_K, QType.Q6_K),
    "Q6_K": (QType.Q6_K, QType.Q6_K),
    "Q8_0": (QType.Q8_0, QType.Q8_0),
    "Q4_0": (QType.Q4_0, QType.Q8_0),
}
_HIGH_PRECISION_ROLES = ("attn_v", "ffn_down", "token_embd", "output")
_UNTIED = ("llama", "llama3", "qwen2", "phi3", "phi3_long")
# "llama3" is the llama architecture with Llama 3.1's RoPE scaling, which llama.cpp stores as
# per-frequency factors in a `rope_freqs` tensor.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
LLAMA3_THETA = 500000.0


# "phi3_long" is phi3 with LongRoPE (Phi-3.5, Phi-3 128k): its factors are tensors too.
LONG_ROPE_CONTEXT = 64
LONG_FACTORS = [1.0 + 0.25 * (i % 8) for i in range(HEAD_DIM // 2)]
SHORT_FACTORS = [1.0 + 0.125 * (i % 4) for i in range(HEAD_DIM // 2)]
_VARIANTS = {"llama3": "llama", "phi3_long": "phi3"}
CONFIG_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def gguf_architecture(arch: str) -> str:
    return _VARIANTS.get(arch, arch)


def llama3_rope_freqs() -> np.ndarray:
    """llama.cpp's converter: the factor dividing each RoPE frequency (Llama 3.1)."""
    factor, low, high = LLAMA3_ROPE["factor"], LLAMA3_ROPE["low_freq_factor"], 4.0
    context = 8192
    inverse = 1.0 / LLAMA3_THETA ** (np.arange(0, HEAD_DIM, 2, dtype=np.float64) / HEAD_DIM)
    wavelen = 2 * np.pi / inverse
    smooth = (context / wavelen - low) / (high - low)
    factors = np.where(wavelen > context / low, factor, 1 / ((1 - smooth) / factor + smooth))
    return np.where(wavelen < context / high, 1.0, factors).astype(np.float32)


_GEMMA = ("gemma2", "gemma3")


def _matrix_shapes(arch: str, vocab: int) -> dict[str, tuple[int, int]]:
    shapes = {"token_embd": (vocab, HIDDEN), "blk.N.attn_output": (HIDDEN, HEADS * HEAD_DIM)}
    if arch == "phi3":
        shapes["blk.N.attn_qkv"] = ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN)
        shapes["blk.N.ffn_up"] = (2 * FFN, HIDDEN)
    else:
        shapes["blk.N.attn_q"] = (HEADS * HEAD_DIM, HIDDEN)
        shapes["blk.N.attn_k"] = (KV_HEADS * HEAD_DIM, HIDDEN)
        shapes["blk.N.attn_v"] = (KV_HEADS * HEAD_DIM, HIDDEN)
        shapes["blk.N.ffn_gate"] = (FFN, HIDDEN)
        shapes["blk.N.ffn_up"] = (FFN, HIDDEN)
    shapes["blk.N.ffn_down"] = (HIDDEN, FFN)
    if arch in _UNTIED:
        shapes["output"] = (vocab, HIDDEN)
    return shapes


def _vector_shapes(arch: str) -> dict[str, int]:
    shapes = {"output_norm": HIDDEN, "blk.N.attn_norm": HIDDEN, "blk.N.ffn_norm": HIDDEN}
    if arch == "qwen2":
        shapes |= {"blk.N.attn_q.bias": HEADS * HEAD_DIM, "blk.N.attn_k.bias": HEAD_DIM}
        shapes["blk.N.attn_v.bias"] = KV_HEADS * HEAD_DIM
    if arch in ("qwen3", "gemma3"):
        shapes |= {"blk.N.attn_q_norm": HEAD_DIM, "blk.N.attn_k_norm": HEAD_DIM}
    if arch in _GEMMA:
        shapes |= {"blk.N.post_attention_norm": HIDDEN, "blk.N.post_ffw_norm": HIDDEN}
    return shapes


def layers_of(arch: str) -> int:
    """One layer, but six for Gemma 3: mlx-lm's model reads the cache of its sixth layer."""
    return 6 if arch == "gemma3" else 1


def _per_layer(shapes: dict[str, Any], arch: str) -> dict[str, Any]:
    return {
        role.replace("blk.N.", f"blk.{layer}."): shape
        for role, shape in shapes.items()
        for layer in (range(layers_of(arch)) if role.startswith("blk.N.") else [0])
    }


def tiny_metadata(arch: str) -> dict[str, Any]:
    tokens, merges, types = byte_level_vocabulary()
    rope_theta = LLAMA3_THETA if arch == "llama3" else 10000.0
    arch = gguf_architecture(arch)
    metadata: dict[str, Any] = {
        f"{arch}.embedding_length": HIDDEN,
        f"{arch}.block_count": layers_of(arch),
        f"{arch}.feed_forward_length": FFN,
        f"{arch}.attention.head_count": HEADS,
        f"{arch}.attention.head_count_kv": KV_HEADS,
        f"{arch}.attention.key_length": HEAD_DIM,
        f"{arch}.attention.value_length": HEAD_DIM,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
        f"{arch}.rope.freq_base": rope_theta,
        f"{arch}.rope.dimension_count": HEAD_DIM,
        f"{arch}.context_length": CONTEXT,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": SPECIALS.index("<|im_start|>"),
        "tokenizer.ggml.eos_token_id": SPECIALS.index("<|im_end|>"),
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHATML,
    }
    if arch in _GEMMA:
        metadata[f"{arch}.attention.sliding_window"] = 512
    if arch == "gemma2":
        metadata |= {"gemma2.attn_logit_softcapping": 50.0, "gemma2.final_logit_softcapping": 30.0}
    return metadata


def _scheme_type(role: str, scheme: str) -> QType:
    main, high = SCHEMES[scheme]
    return high if role.rpartition(".")[2] in _HIGH_PRECISION_ROLES else main


def write_tiny_model(
    path: Path, arch: str, scheme: str, seed: int = 0, tokenizer: dict[str, Any] | None = None
) -> TinyGGUF:
    """A small model of `arch` in GGUF layout: matrices in `scheme`'s types, vectors F32
    (Gemma's norms stored as 1 + w, as llama.cpp writes them); `tokenizer` replaces the
    byte-level vocabulary's metadata."""
    rng = np.random.default_rng(seed)
    vocab = len(byte_level_vocabulary()[0])
    variant, arch = arch, gguf_architecture(arch)
    tensors: dict[str, tuple[np.ndarray, QType]] = {}
    for role, shape in _per_layer(_matrix_shapes(arch, vocab), arch).items():
        weights = rng.normal(size=shape).astype(np.float32) * (
            0.5 if role == "token_embd" else 0.06
        )
        tensors[f"{role}.weight"] = (weights, _scheme_type(role, scheme))
    for role, size in _per_layer(_vector_shapes(arch), arch).items():
        is_norm = role.endswith("norm")
        values = rng.normal(size=(1, size)).astype(np.float32) * (0.1 if is_norm else 0.5)
        if is_norm:  # near 1; for Gemma this is what llama.cpp stores, 1 + w
            values += 1.0
        name = role if role.endswith(".bias") else f"{role}.weight"
        tensors[name] = (values.reshape(size), QType.F32)
    metadata = tiny_metadata(variant)
    if tokenizer is not None:  # another vocabulary than the byte-level one
        metadata = {k: v for k, v in metadata.items() if not k.startswith("tokenizer.")}
        metadata |= tokenizer
    if variant == "llama3":
        tensors["rope_freqs.weight"] = (llama3_rope_freqs(), QType.F32)
    if variant == "phi3_long":
        tensors["rope_factors_long.weight"] = (np.array(LONG_FACTORS, np.float32), QType.F32)
        tensors["rope_factors_short.weight"] = (np.array(SHORT_FACTORS, np.float32), QType.F32)
        metadata["phi3.rope.scaling.original_context_length"] = LONG_ROPE_CONTEXT
    return write_gguf(path, arch, metadata, tensors)


# The same weights as mlx-lm models, named and shaped by hand (not by the converter).
_MLX_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}
_ROLE_BY_ARCH = {
    "phi3": {"ffn_up": "mlp.gate_up_proj", "ffn_norm": "post_attention_layernorm"},
    "gemma2": {
        "ffn_up": "mlp.up_proj",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}
_ROLE_BY_ARCH["gemma3"] = _ROLE_BY_ARCH["gemma2"]
_DEFAULT_ROLES = {"ffn_up": "mlp.up_proj", "ffn_norm": "post_attention_layernorm"}
_MODEL_TYPES = {"gemma3": "gemma3_text", "llama3": "llama", "phi3_long": "phi3"}


def reference_config(arch: str) -> dict[str, Any]:
    """mlx-lm's config for `write_tiny_model(arch)`, in Hugging Face's layout (no permuted
    Q/K, so no traditional RoPE for llama)."""
    config: dict[str, Any] = {
        "model_type": _MODEL_TYPES.get(arch, arch),
        "hidden_size": HIDDEN,
        "num_hidden_layers": layers_of(arch),
        "intermediate_size": FFN,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": CONTEXT,
        "vocab_size": len(byte_level_vocabulary()[0]),
        "tie_word_embeddings": arch not in _UNTIED,
    }
    if arch in _GEMMA:
        config |= {"query_pre_attn_scalar": float(HEAD_DIM), "sliding_window": 512}
    if arch == "llama3":
        config |= {"rope_theta": LLAMA3_THETA, "rope_scaling": LLAMA3_ROPE}
    if arch == "phi3_long":
        long_rope = {"type": "longrope", "long_factor": LONG_FACTORS, "short_factor": SHORT_FACTORS}
        config |= {"rope_scaling": long_rope, "original_max_position_embeddings": LONG_ROPE_CONTEXT}
    return config


def _unpermute(weights: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K permutation for interleaved RoPE."""
    rows, cols = weights.shape
    return weights.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def reference_weights(tiny: TinyGGUF, arch: str) -> dict[str, np.ndarray]:
    """What each tensor means in mlx-lm's names: Gemma's norms less 1, llama's Q/K unpermuted."""
    roles = {**_MLX_NAMES, **_ROLE_BY_ARCH.get(gguf_architecture(arch), _DEFAULT_ROLES)}
    weights: dict[str, np.ndarray] = {}
    for name, stored in tiny.meant.items():
        base, _, suffix = name.rpartition(".")
        role = base.rpartition(".")[2]
        value = stored
        if name in CONFIG_TENSORS:
            continue  # config, not weights
        if arch in ("llama", "llama3") and role in ("attn_q", "attn_k"):
            value = _unpermute(stored, HEADS if role == "attn_q" else KV_HEADS)
        if arch in _GEMMA and role.endswith("norm"):
            value = stored - 1.0
        prefix = f"model.layers.{base.split('.')[1]}." if base.startswith("blk.") else ""
        weights[f"{prefix}{roles[role]}.{suffix}"] = value
    return weights
