"""Turn a llama-family GGUF file into an mlx-lm model directory, once, cached by hash.

`mx.load` reads GGUF natively: Q4_0, Q4_1 and Q8_0 tensors come back already packed
for MLX (`weight` uint32, `scales`, `biases`; affine, group size 32); other types come
back as floats. We rename llama.cpp's tensors to mlx-lm's llama names, write
`config.json` from the metadata and rebuild the tokenizer with transformers' torch-free
GGUF tokenizer builders.

The result lives in `cache_root/<sha256 of the file>-<dtype>/` (see `compute_dtype`),
written into a temporary directory and renamed into place, so an interrupted conversion
never leaves a half-written cache. The hash of a file is remembered per (absolute path,
size, mtime) in `cache_root/gguf-hashes.json`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, cast

import mlx.core as mx

from ..errors import StartupError
from .progress import describe_bytes, progress

logger = logging.getLogger(__name__)
Weights = dict[str, mx.array]
Metadata = dict[str, Any]

SUPPORTED_ARCHITECTURES = ("llama",)
GROUP_SIZE = 32
HASH_INDEX_NAME = "gguf-hashes.json"
_MATRIX_NDIM = 2
_HASH_CHUNK_BYTES = 16 << 20
_FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
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
# What we use of transformers.integrations.gguf.gguf_tokenizer_mapping.
_TOKENIZER_BUILDERS = (
    "GGUF_TOKENIZER_MAPPING",
    "_SPECIAL_TOKENS",
    "select_tokenizer_builder",
    "add_gguf_special_tokens",
    "set_split_regex",
)


def is_gguf_file(path: Path) -> bool:
    """True for an existing file named `*.gguf`."""
    return path.suffix.lower() == ".gguf" and path.is_file()


def convert_gguf(gguf_path: Path, cache_root: Path) -> Path:
    """The mlx-lm model directory for `gguf_path`, converting it on the first call."""
    gguf_path = gguf_path.resolve()
    if not gguf_path.is_file():
        raise StartupError(f"GGUF file {gguf_path} does not exist or is not a file.")
    _make_cache_root(cache_root)
    dtype = compute_dtype()
    model_dir = cache_root / f"{file_sha256(gguf_path, cache_root)}-{_dtype_name(dtype)}"
    if (model_dir / "config.json").is_file():
        logger.info("using %s, converted before", model_dir)
        return model_dir
    began = time.monotonic()
    logger.info("converting %s to an MLX model in %s (once)", gguf_path.name, model_dir)
    weights, metadata = _read_gguf(gguf_path)
    with tempfile.TemporaryDirectory(dir=cache_root, prefix=".converting-") as tmp:
        staging = Path(tmp) / "model"
        staging.mkdir()
        _write_model_dir(staging, (weights, metadata), dtype, gguf_path)
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


def _read_gguf(path: Path) -> tuple[Weights, Metadata]:
    logger.info("reading %s (%s)", path.name, describe_bytes(path.stat().st_size))
    try:
        loaded = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError, OSError) as exc:
        raise StartupError(f"{path} is not a readable GGUF file ({exc}).") from exc
    weights, metadata = cast("tuple[Weights, Metadata]", loaded)
    architecture = metadata.get("general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise StartupError(
            f"{path.name}: GGUF architecture {architecture!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens"):
        if key not in metadata:
            raise StartupError(f"{path.name}: GGUF file has no tokenizer (no metadata {key!r}).")
    return weights, metadata


def _write_model_dir(
    dest: Path, gguf: tuple[Weights, Metadata], dtype: mx.Dtype, source: Path
) -> None:
    weights, metadata = gguf
    renamed = _rename_tensors(weights, source)
    quantization = _quantization_config(renamed)
    config = _model_config(metadata, renamed, quantization)
    converted = _cast_floats(renamed, dtype)
    logger.info("writing model.safetensors")
    mx.save_safetensors(str(dest / "model.safetensors"), converted, {"format": "mlx"})
    _write_json_atomically(dest / "config.json", config)
    logger.info("building the tokenizer (%d tokens)", len(metadata["tokenizer.ggml.tokens"]))
    _write_tokenizer(dest, metadata, source)


def _rename_tensors(weights: Weights, source: Path) -> Weights:
    renamed: Weights = {}
    for name, tensor in weights.items():
        _check_dtype(name, tensor, weights, source)
        renamed[_mlx_name(name, source)] = tensor
    return renamed


def _mlx_name(gguf_name: str, source: Path) -> str:
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".")
    if base in _TOP_LEVEL_NAMES:
        return f"{_TOP_LEVEL_NAMES[base]}.{suffix}"
    match parts:
        case ["blk", layer, role] if role in _BLOCK_NAMES:
            return f"model.layers.{layer}.{_BLOCK_NAMES[role]}.{suffix}"
    raise StartupError(
        f"{source.name}: tensor {gguf_name!r} has no counterpart in mlx-lm's llama "
        "model; this GGUF variant is not supported."
    )


def _check_dtype(name: str, tensor: mx.array, weights: Weights, source: Path) -> None:
    base = name.rpartition(".")[0]
    packed = f"{base}.scales" in weights and name == f"{base}.weight"
    expected = (mx.uint32,) if packed else _FLOAT_DTYPES
    if tensor.dtype not in expected:
        raise StartupError(
            f"{source.name}: tensor {name!r} has dtype {tensor.dtype} after reading, "
            "which cannot be converted; use a Q4_0, Q4_1, Q8_0, F16 or F32 file."
        )


def _quantization_config(weights: Weights) -> dict[str, Any] | None:
    """mlx-lm's `quantization` entry: the most common bits, and per-layer exceptions."""
    bits_by_layer = {
        name.removesuffix(".scales"): _packed_bits(weights, name.removesuffix(".scales"))
        for name in weights
        if name.endswith(".scales")
    }
    if not bits_by_layer:
        return None
    common_bits = Counter(bits_by_layer.values()).most_common(1)[0][0]
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
            config[layer] = False  # came back as floats (e.g. a K-quant): keep unquantized
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


def _cast_floats(weights: Weights, dtype: mx.Dtype) -> Weights:
    """Scales, biases, norms and unquantized tensors in the model's compute dtype, evaluated
    one tensor at a time so that the progress shown is the work done."""
    total_bytes = sum(tensor.nbytes for tensor in weights.values())
    logger.info(
        "converting %d tensors (%s) to %s",
        len(weights),
        describe_bytes(total_bytes),
        _dtype_name(dtype),
    )
    converted: Weights = {}
    with progress(logger, "converting tensors", total_bytes) as advance:
        for name, tensor in weights.items():
            converted[name] = tensor.astype(dtype) if tensor.dtype in _FLOAT_DTYPES else tensor
            mx.eval(converted[name])
            advance(tensor.nbytes)
    return converted


def _scalar(metadata: Metadata, key: str, default: Any = None) -> Any:
    value = metadata.get(key, default)
    if value is None:
        raise StartupError(f"GGUF metadata lacks {key!r}, needed to build the model config.")
    if isinstance(value, mx.array):
        if value.ndim != 0:
            raise StartupError(f"GGUF metadata {key!r} is per-layer; only one value is supported.")
        return value.item()
    return value


def _model_config(
    metadata: Metadata, weights: Weights, quantization: dict[str, Any] | None
) -> dict[str, Any]:
    arch = metadata["general.architecture"]
    heads = int(_scalar(metadata, f"{arch}.attention.head_count"))
    hidden = int(_scalar(metadata, f"{arch}.embedding_length"))
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(_scalar(metadata, f"{arch}.block_count")),
        "intermediate_size": int(_scalar(metadata, f"{arch}.feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_scalar(metadata, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(_scalar(metadata, f"{arch}.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(_scalar(metadata, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_scalar(metadata, f"{arch}.rope.freq_base", 10000.0)),
        "rope_traditional": True,  # llama.cpp permutes Q/K for interleaved RoPE
        "max_position_embeddings": int(_scalar(metadata, f"{arch}.context_length", 2048)),
        "vocab_size": int(_scalar(metadata, f"{arch}.vocab_size", len(tokens))),
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "rope_scaling": _rope_scaling(metadata, arch),
    }
    for name in ("bos_token_id", "eos_token_id"):
        if f"tokenizer.ggml.{name}" in metadata:
            config[name] = int(_scalar(metadata, f"tokenizer.ggml.{name}"))
    if quantization is not None:
        config["quantization"] = quantization
    return config


def _rope_scaling(metadata: Metadata, arch: str) -> dict[str, Any] | None:
    kind = metadata.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {
            "type": "linear",
            "factor": float(_scalar(metadata, f"{arch}.rope.scaling.factor")),
        }
    raise StartupError(f"GGUF RoPE scaling {kind!r} is not supported (only 'linear').")


def _plain(value: Any) -> Any:
    """Metadata as Python values: mx scalars and arrays become numbers and lists."""
    return value.tolist() if isinstance(value, mx.array) else value


def _tokenizer_metadata(metadata: Metadata, mapping: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(tokenizer_dict, tokenizer_config)` as `get_gguf_tokenizer` builds them."""
    grouped = {
        group: {
            name: _plain(metadata[f"tokenizer.{key}"])
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
        token_id = _plain(metadata.get(f"tokenizer.ggml.{key}"))
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


def _write_tokenizer(dest: Path, metadata: Metadata, source: Path) -> None:
    transformers, mapping = _import_tokenizer_builders()
    tokenizer_dict, tokenizer_config = _tokenizer_metadata(metadata, mapping)
    try:
        builder = mapping.select_tokenizer_builder("llama", tokenizer_dict["tokenizer_type"])
        built = mapping.add_gguf_special_tokens(builder(tokenizer_dict), tokenizer_dict)
        built = mapping.set_split_regex(built, tokenizer_dict)
    except (ValueError, KeyError, TypeError) as exc:
        raise StartupError(f"{source.name}: cannot build its tokenizer ({exc}).") from exc
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
