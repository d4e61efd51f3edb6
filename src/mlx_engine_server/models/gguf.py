"""Turn a GGUF file into an mlx-lm model directory, once, cached by hash.

gguf-py's reader maps the file; `gguf_arch.py` says what each architecture is in mlx-lm
(tensor names, config from the metadata, norm conventions) and `gguf_quants.py` turns each
tensor into MLX arrays: Q4_0, Q4_1, Q8_0 and Q4_K repacked without loss, the other types
decoded and re-quantized as `--gguf-requantize` says. The tokenizer and its chat template
are rebuilt from the file with transformers' torch-free GGUF tokenizer builders.

The result lives in `cache_root/<sha256 of the file>-<dtype>-requantize-<setting>/` (see
`compute_dtype`), written into a temporary directory and renamed into place, so an
interrupted conversion never leaves a half-written cache. The hash of a file is remembered
per (absolute path, size, mtime) in `cache_root/gguf-hashes.json`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from gguf import GGMLQuantizationType as QType
from gguf import GGUFReader

from ..errors import StartupError
from .gguf_arch import CONFIG_TENSORS, Architecture, architecture_of, model_config
from .gguf_quants import (
    GROUP_SIZE,
    Requantize,
    SourceTensor,
    dequantize,
    is_quantized,
    is_repacked_losslessly,
    to_mlx,
)
from .progress import describe_bytes, progress

logger = logging.getLogger(__name__)
Weights = dict[str, mx.array]
Metadata = dict[str, Any]

DEFAULT_REQUANTIZE: Requantize = "auto"
HASH_INDEX_NAME = "gguf-hashes.json"
_MATRIX_NDIM = 2
_HASH_CHUNK_BYTES = 16 << 20
_FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
# What we use of transformers.integrations.gguf.gguf_tokenizer_mapping.
_TOKENIZER_BUILDERS = (
    "GGUF_TOKENIZER_MAPPING",
    "_SPECIAL_TOKENS",
    "select_tokenizer_builder",
    "add_gguf_special_tokens",
    "set_split_regex",
)


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    arch: Architecture
    metadata: Metadata
    tensors: list[SourceTensor]
    rope_tensors: dict[str, list[float]]  # RoPE scaling that llama.cpp stores as tensors


def is_gguf_file(path: Path) -> bool:
    """True for an existing file named `*.gguf`."""
    return path.suffix.lower() == ".gguf" and path.is_file()


def convert_gguf(
    gguf_path: Path, cache_root: Path, requantize: Requantize = DEFAULT_REQUANTIZE
) -> Path:
    """The mlx-lm model directory for `gguf_path`, converting it on the first call."""
    gguf_path = gguf_path.resolve()
    if not gguf_path.is_file():
        raise StartupError(f"GGUF file {gguf_path} does not exist or is not a file.")
    _make_cache_root(cache_root)
    dtype = compute_dtype()
    digest = file_sha256(gguf_path, cache_root)
    model_dir = cache_root / f"{digest}-{_dtype_name(dtype)}-requantize-{requantize}"
    if (model_dir / "config.json").is_file():
        logger.info("using %s, converted before", model_dir)
        return model_dir
    began = time.monotonic()
    logger.info("converting %s to an MLX model in %s (once)", gguf_path.name, model_dir)
    gguf = _read_gguf(gguf_path)
    with tempfile.TemporaryDirectory(dir=cache_root, prefix=".converting-") as tmp:
        staging = Path(tmp) / "model"
        staging.mkdir()
        _write_model_dir(staging, gguf, dtype, requantize)
        _publish(staging, model_dir)
    logger.info("converted %s in %.1f s", gguf_path.name, time.monotonic() - began)
    return model_dir


def file_sha256(path: Path, cache_root: Path) -> str:
    """SHA-256 of `path`, remembered in the cache index while size and mtime hold."""
    stat = path.stat()
    key = str(path.resolve())
    stamp = {"size_bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    index = _read_hash_index(cache_root)
    entry = index.get(key)
    if isinstance(entry, dict) and all(entry.get(k) == v for k, v in stamp.items()):
        return str(entry["sha256"])
    what = f"hashing {path.name}"
    logger.info("%s (%s) to find its converted copy", what, describe_bytes(stat.st_size))
    digest = hashlib.sha256()
    with path.open("rb") as handle, progress(logger, what, stat.st_size) as advance:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
            advance(len(chunk))
    index[key] = {**stamp, "sha256": digest.hexdigest()}
    _write_json_atomically(cache_root / HASH_INDEX_NAME, index)
    return digest.hexdigest()


def _make_cache_root(cache_root: Path) -> None:
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"Cannot create the GGUF cache directory {cache_root}: {exc}") from exc


def _read_hash_index(cache_root: Path) -> dict[str, Any]:
    try:
        index = json.loads((cache_root / HASH_INDEX_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def _write_json_atomically(path: Path, value: object) -> None:
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, prefix=f".{path.name}-", delete=False, encoding="utf-8"
    ) as handle:
        json.dump(value, handle, indent=2)
    os.replace(handle.name, path)


def _publish(staging: Path, model_dir: Path) -> None:
    """Move a finished conversion into place; losing a race to another process is ok."""
    try:
        staging.rename(model_dir)
    except OSError as exc:
        if not (model_dir / "config.json").is_file():
            raise StartupError(f"Cannot write the converted model to {model_dir}: {exc}") from exc


def _read_gguf(path: Path) -> GGUFFile:
    logger.info("reading %s (%s)", path.name, describe_bytes(path.stat().st_size))
    try:
        reader = GGUFReader(path)
        metadata = {
            name: field.contents()
            for name, field in reader.fields.items()
            if not name.startswith("GGUF.")
        }
    except (ValueError, OSError, IndexError, KeyError, UnicodeDecodeError) as exc:
        raise StartupError(f"{path} is not a readable GGUF file ({exc}).") from exc
    arch = architecture_of(metadata, path.name)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens"):
        if key not in metadata:
            raise StartupError(f"{path.name}: GGUF file has no tokenizer (no metadata {key!r}).")
    tensors = [SourceTensor(t.name, QType(t.tensor_type), t.data) for t in reader.tensors]
    rope = {t.name: dequantize(t).reshape(-1).tolist() for t in tensors if t.name in CONFIG_TENSORS}
    weights = [t for t in tensors if t.name not in CONFIG_TENSORS]  # those are config
    return GGUFFile(path, arch, metadata, weights, rope)


def _write_model_dir(dest: Path, gguf: GGUFFile, dtype: mx.Dtype, requantize: Requantize) -> None:
    weights = _convert_tensors(gguf, dtype, requantize)
    has_lm_head = "lm_head.weight" in weights
    config = model_config(gguf.arch, gguf.metadata, has_lm_head, gguf.rope_tensors)
    quantization = _quantization_config(weights)
    if quantization is not None:
        config["quantization"] = quantization
    logger.info("writing model.safetensors")
    mx.save_safetensors(str(dest / "model.safetensors"), weights, {"format": "mlx"})
    _write_json_atomically(dest / "config.json", config)
    logger.info("building the tokenizer (%d tokens)", len(gguf.metadata["tokenizer.ggml.tokens"]))
    _write_tokenizer(dest, gguf)


def _convert_tensors(gguf: GGUFFile, dtype: mx.Dtype, requantize: Requantize) -> Weights:
    """Each tensor renamed, decoded or repacked, in the compute dtype, evaluated one at a time
    so that the progress shown is the work done."""
    total_bytes = sum(tensor.data.nbytes for tensor in gguf.tensors)
    logger.info(
        "converting %d tensors (%s) to %s%s",
        len(gguf.tensors),
        describe_bytes(total_bytes),
        _dtype_name(dtype),
        _describe_requantize(gguf, requantize),
    )
    converted: Weights = {}
    with progress(logger, "converting tensors", total_bytes) as advance:
        for tensor in gguf.tensors:
            converted.update(_convert_tensor(gguf, tensor, dtype, requantize))
            advance(tensor.data.nbytes)
    return converted


def _convert_tensor(
    gguf: GGUFFile, tensor: SourceTensor, dtype: mx.Dtype, requantize: Requantize
) -> Weights:
    name = gguf.arch.mlx_name(tensor.name)
    if name is None:
        raise StartupError(
            f"{gguf.path.name}: tensor {tensor.name!r} has no counterpart in mlx-lm's "
            f"{gguf.arch.model_type} model; this GGUF variant is not supported."
        )
    try:
        packed = to_mlx(tensor, requantize)
    except ValueError as exc:
        raise StartupError(
            f"{gguf.path.name}: tensor {tensor.name!r} has type {tensor.qtype.name}, which "
            f"cannot be converted ({exc})."
        ) from exc
    if gguf.arch.norm_offset and tensor.name.endswith("norm.weight"):
        packed["weight"] = packed["weight"] - gguf.arch.norm_offset
    base = name.removesuffix(".weight")
    out = {
        (name if suffix == "weight" else f"{base}.{suffix}"): _in_dtype(array, dtype)
        for suffix, array in packed.items()
    }
    mx.eval(*out.values())
    return out


def _in_dtype(array: mx.array, dtype: mx.Dtype) -> mx.array:
    return array.astype(dtype) if array.dtype in _FLOAT_DTYPES else array


def _describe_requantize(gguf: GGUFFile, requantize: Requantize) -> str:
    decoded = Counter(
        t.qtype.name
        for t in gguf.tensors
        if is_quantized(t.qtype) and not is_repacked_losslessly(t.qtype)
    )
    if not decoded:
        return ""
    what = "kept as floats" if requantize == "none" else f"re-quantized ({requantize})"
    kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(decoded.items()))
    return f"; {kinds} decoded and {what}"


def _quantization_config(weights: Weights) -> dict[str, Any] | None:
    """mlx-lm's `quantization` entry: the bits most weights have, and per-layer exceptions."""
    bits_by_layer = {
        name.removesuffix(".scales"): _packed_bits(weights, name.removesuffix(".scales"))
        for name in weights
        if name.endswith(".scales")
    }
    if not bits_by_layer:
        return None
    weights_by_bits: Counter[int] = Counter()
    for layer, bits in bits_by_layer.items():
        weights_by_bits[bits] += weights[f"{layer}.scales"].size  # in proportion to the weights
    common_bits = weights_by_bits.most_common(1)[0][0]
    config: dict[str, Any] = {
        "group_size": GROUP_SIZE,
        "bits": common_bits,
        "mode": "affine",
    }
    for layer, bits in bits_by_layer.items():
        if bits != common_bits:
            config[layer] = {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"}
    for name, tensor in weights.items():
        layer = name.removesuffix(".weight")
        if tensor.ndim == _MATRIX_NDIM and layer not in bits_by_layer:
            config[layer] = False  # stored as floats in the file, or kept as floats: unquantized
    return config


def _packed_bits(weights: Weights, layer: str) -> int:
    in_features = weights[f"{layer}.scales"].shape[-1] * GROUP_SIZE
    return weights[f"{layer}.weight"].shape[-1] * 32 // in_features


def compute_dtype() -> mx.Dtype:
    """float32 on the CPU (its float16 was slow and wrong on SmolLM2), else bfloat16.

    Not float16: llama-family models are trained in bfloat16 and their activations can
    overflow float16's range; llama.cpp computes in float32.
    """
    return mx.float32 if mx.default_device().type == mx.cpu else mx.bfloat16


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).rpartition(".")[2]


def _tokenizer_metadata(metadata: Metadata, mapping: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(tokenizer_dict, tokenizer_config)` as `get_gguf_tokenizer` builds them."""
    grouped = {
        group: {
            name: metadata[f"tokenizer.{key}"]
            for key, name in renames.items()
            if f"tokenizer.{key}" in metadata
        }
        for group, renames in mapping.GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer_dict["tokenizer_type"] == "llama":
        tokenizer_config.setdefault("add_bos_token", True)
    tokens = tokenizer_dict["tokens"]
    for name, key in mapping._SPECIAL_TOKENS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if token_id is not None:
            tokenizer_config[name] = tokens[token_id]
    return tokenizer_dict, tokenizer_config


def _import_tokenizer_builders() -> tuple[Any, Any]:
    try:
        # Imported here: transformers is slow to import and only conversion needs it.
        import transformers  # noqa: PLC0415
        from transformers.integrations.gguf import (  # noqa: PLC0415
            gguf_tokenizer_mapping as mapping,
        )

        missing = [name for name in _TOKENIZER_BUILDERS if not hasattr(mapping, name)]
    except ImportError as exc:
        raise StartupError(
            f"Converting a GGUF tokenizer needs transformers 5.23 or newer ({exc})."
        ) from exc
    if missing:
        raise StartupError(
            "Converting a GGUF tokenizer needs transformers 5.23 or newer; "
            f"transformers {transformers.__version__} lacks {', '.join(missing)}."
        )
    return transformers, mapping


def _write_tokenizer(dest: Path, gguf: GGUFFile) -> None:
    transformers, mapping = _import_tokenizer_builders()
    tokenizer_dict, tokenizer_config = _tokenizer_metadata(gguf.metadata, mapping)
    try:
        kind = tokenizer_dict["tokenizer_type"]
        builder = mapping.select_tokenizer_builder(gguf.arch.name, kind)
        built = mapping.add_gguf_special_tokens(builder(tokenizer_dict), tokenizer_dict)
        built = mapping.set_split_regex(built, tokenizer_dict)
    except (ValueError, KeyError, TypeError) as exc:
        raise StartupError(f"{gguf.path.name}: cannot build its tokenizer ({exc}).") from exc
    backend = built.backend_tokenizer
    if tokenizer_dict.get("pre_tokenizer_type") == "smollm":  # not in transformers' table
        backend.pre_tokenizer = _smollm_pre_tokenizer()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config)
    tokenizer.save_pretrained(str(dest))


def _smollm_pre_tokenizer() -> Any:
    """llama.cpp's "smollm" split: every digit alone, then GPT-2's byte-level split."""
    from tokenizers import pre_tokenizers  # noqa: PLC0415  (comes with transformers)

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
