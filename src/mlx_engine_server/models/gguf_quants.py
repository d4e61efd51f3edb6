"""GGUF tensors as MLX arrays: floats, packed affine weights, or re-quantized weights.

Q4_0, Q4_1, Q8_0 and Q4_K blocks are affine already (a scale and an offset for each 32 weights:
Q4_K's 6-bit sub-block scale and min times its super-block's), so they are repacked without loss
into MLX's layout (`weight` uint32, `scales`, `biases`; group size 32) — for the first three the
same arrays `mx.load` gives. Every other quantized type (Q2_K, Q3_K, Q5_K, Q6_K, Q5_0, Q5_1, the
IQ types) is decoded with gguf-py's reference dequantizer and, as the `--gguf-requantize` setting
says, quantized again to MLX's affine 4 or 8 bits or kept as floats. `mx.load` is not used for the
K-quants: its Q4_K decoder applies the even sub-block's scale and min to the odd sub-block too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, quants
from gguf import GGMLQuantizationType as QType

GROUP_SIZE = 32
Requantize = Literal["auto", "4", "8", "none"]
REQUANTIZE_CHOICES: tuple[Requantize, ...] = ("auto", "4", "8", "none")
_AUTO_4BIT_BELOW_BPW = 5.0  # Q2_K, Q3_K, IQ4_XS -> 4 bits; Q5_K, Q6_K, Q5_0 -> 8 bits
Packed = dict[str, mx.array]  # suffix ("weight", "scales", "biases") -> array

FLOAT_TYPES = (QType.F32, QType.F16, QType.BF16)
# bytes per block of 32 weights, bits of a weight, and the offset added to make it unsigned
_LEGACY_LAYOUTS = {QType.Q4_0: (18, 4, 8), QType.Q4_1: (20, 4, 0), QType.Q8_0: (34, 8, 128)}
_F16_BYTES = 2
_Q4_K_BLOCK_BYTES = 144


@dataclass(frozen=True)
class SourceTensor:
    """One tensor as the file stores it: numpy rows of bytes or floats, shape as in mlx-lm."""

    name: str
    qtype: QType
    data: np.ndarray  # (..., bytes per row) for quantized types, the floats otherwise


def is_quantized(qtype: QType) -> bool:
    return qtype not in FLOAT_TYPES


def is_repacked_losslessly(qtype: QType) -> bool:
    """True for the types whose blocks MLX's affine layout holds exactly."""
    return qtype in _LEGACY_LAYOUTS or qtype == QType.Q4_K


def dequantize(tensor: SourceTensor) -> np.ndarray:
    """float32 weights, decoded by gguf-py (the reference for every type ggml defines)."""
    try:
        return np.asarray(quants.dequantize(tensor.data, tensor.qtype), dtype=np.float32)
    except NotImplementedError as exc:
        raise ValueError(f"gguf-py cannot decode {tensor.qtype.name}") from exc


def to_mlx(tensor: SourceTensor, requantize: Requantize) -> Packed:
    """The tensor's arrays for an mlx-lm checkpoint."""
    if tensor.qtype in _LEGACY_LAYOUTS:
        return repack_legacy(tensor.data, tensor.qtype)
    if tensor.qtype == QType.Q4_K:
        return repack_q4_k(tensor.data)
    floats = mx.array(dequantize(tensor))
    bits = requantized_bits(tensor.qtype, requantize)
    if bits is None or floats.ndim != 2 or floats.shape[-1] % GROUP_SIZE:  # noqa: PLR2004
        return {"weight": floats}
    weight, scales, biases = mx.quantize(floats, group_size=GROUP_SIZE, bits=bits)
    return {"weight": weight, "scales": scales, "biases": biases}


def requantized_bits(qtype: QType, requantize: Requantize) -> int | None:
    """MLX bits for a decoded tensor of `qtype`; None keeps it as floats.

    "auto" keeps about the file's precision: 4 bits for types under 5 bits a weight, else 8.
    """
    if requantize == "none" or not is_quantized(qtype):
        return None
    if requantize == "auto":
        block_weights, block_bytes = GGML_QUANT_SIZES[qtype]
        return 4 if block_bytes * 8 / block_weights < _AUTO_4BIT_BELOW_BPW else 8
    return int(requantize)


def repack_legacy(data: np.ndarray, qtype: QType) -> Packed:
    """Q4_0, Q4_1 or Q8_0 rows of blocks as MLX affine arrays, without loss."""
    block_bytes, bits, offset = _LEGACY_LAYOUTS[qtype]
    rows = data.shape[:-1]
    blocks = data.reshape(-1, block_bytes)
    scale = blocks[:, :_F16_BYTES].copy().view(np.float16).astype(np.float32)[:, 0]
    if qtype == QType.Q4_1:
        bias = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0]
        values = _unpack_nibbles(blocks[:, 4:])
    elif qtype == QType.Q4_0:
        bias = -offset * scale
        values = _unpack_nibbles(blocks[:, 2:])
    else:
        bias = -offset * scale
        values = (blocks[:, 2:].view(np.int8).astype(np.int16) + offset).astype(np.uint8)
    words = _pack_words(values, bits).reshape(*rows, -1)
    return {
        "weight": mx.array(words),
        "scales": mx.array(scale.reshape(*rows, -1)),
        "biases": mx.array(bias.reshape(*rows, -1)),
    }


def repack_q4_k(data: np.ndarray) -> Packed:
    """Q4_K rows as MLX 4-bit affine, group size 32, without loss: each 32-weight sub-block
    has scale `d * sc` and bias `-dmin * m` (ggml's layout, as gguf-py's decoder reads it)."""
    rows = data.shape[:-1]
    blocks = data.reshape(-1, _Q4_K_BLOCK_BYTES)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = quants.Q4_K.get_scale_min(blocks[:, 4:16].copy())
    packed = blocks[:, 16:].reshape(-1, 4, 1, 32)  # byte l of chunk i: sub-blocks 2i and 2i+1
    values = np.concatenate([packed & 0x0F, packed >> 4], axis=2)
    words = _pack_words(values, 4).reshape(*rows, -1)
    scales = d * sc.astype(np.float32)
    biases = -(dmin * m.astype(np.float32))
    return {
        "weight": mx.array(words),
        "scales": mx.array(scales.reshape(*rows, -1)),
        "biases": mx.array(biases.reshape(*rows, -1)),
    }


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """ggml's 4-bit order: byte j holds weight j (low nibble) and weight j + 16 (high)."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def _pack_words(values: np.ndarray, bits: int) -> np.ndarray:
    """MLX's order: weight i of a uint32 at bits `i * bits`, lowest first (little-endian)."""
    flat = values.reshape(-1)
    if bits == 4:  # noqa: PLR2004
        flat = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(flat).view("<u4")
