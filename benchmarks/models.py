"""Models for the benchmarks: random-weight llamas of real shapes, built on the fly, no downloads.

    python benchmarks/models.py smollm2-1.7b [--quantize 4] [--cache-dir DIR]   # prints the dir

`resolve_model(name)` turns a benchmark's `--model` into an mlx-lm model directory:

- a shape name (`tiny`, `smollm2-1.7b`, `llama3-8b`): random weights of that shape, bfloat16 on a
  GPU and float32 on a CPU (`--quantize 4` for 4-bit), with the SmolLM2 tokenizer (vocabulary
  49,152; random weights of real shapes are what matters for speed), built once into the cache;
- `smollm2-gguf`: the bundled SmolLM2-135M-Instruct GGUF, converted with our converter;
- a `.gguf` file (converted the same way) or an existing mlx-lm model directory, used as it is.

Weights are created lazily by the model class and evaluated one layer at a time, so building the
8B shape needs about its own size in memory, not several times that.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from mlx_engine_server.models.gguf import convert_gguf, is_gguf_file
from mlx_engine_server.models.loader import bundled_model_path

DEFAULT_CACHE = Path(tempfile.gettempdir()) / "mlx-bench-models"
GROUP_SIZE = 64
CONTEXT_WINDOW = 8192

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
    },
    "smollm2-1.7b": {
        "hidden_size": 2048,
        "num_hidden_layers": 24,
        "intermediate_size": 8192,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "rope_theta": 130000.0,
        "tie_word_embeddings": True,
    },
    "llama3-8b": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
    },
}
BUNDLED = "smollm2-gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def resolve_model(name: str, cache_root: Path = DEFAULT_CACHE, quantize_bits: int = 0) -> Path:
    """The mlx-lm model directory a benchmark's `--model` names (see the module docstring)."""
    if name in SHAPES:
        return build_shape(name, cache_root, quantize_bits)
    if name == BUNDLED:
        return convert_gguf(bundled_model_path(), cache_root)
    path = Path(name).expanduser()
    if is_gguf_file(path):
        return convert_gguf(path, cache_root)
    if (path / "config.json").is_file():
        return path
    raise SystemExit(f"--model {name}: not a shape ({', '.join(SHAPES)}), {BUNDLED}, .gguf or dir")


def compute_dtype() -> mx.Dtype:
    """bfloat16 on a GPU; float32 on a CPU, where MLX's half-precision kernels are slow."""
    return mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16


def build_shape(shape: str, cache_root: Path, quantize_bits: int = 0) -> Path:
    """Random weights of `shape` in `cache_root`, built on the first call and reused after."""
    dtype_name = str(compute_dtype()).rpartition(".")[2]
    dest = cache_root / f"{shape}-{dtype_name}-q{quantize_bits or 'none'}"
    if (dest / "config.json").is_file():
        return dest
    cache_root.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = tokenizer_source(cache_root)
    config = shape_config(shape, vocab_size(tokenizer_dir))
    staging = Path(tempfile.mkdtemp(dir=cache_root, prefix=".building-"))
    staging.chmod(0o755)
    try:
        write_random_weights(config, staging, quantize_bits)
        copy_tokenizer(tokenizer_dir, staging)
        staging.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def tokenizer_source(cache_root: Path) -> Path:
    """SmolLM2's tokenizer: $MLX_BENCH_TOKENIZER (a directory, for hosts without the bundled
    GGUF package, such as a GPU machine with no package index) or the bundled GGUF's."""
    override = os.environ.get("MLX_BENCH_TOKENIZER")
    return Path(override) if override else convert_gguf(bundled_model_path(), cache_root)


def shape_config(shape: str, vocab: int) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "max_position_embeddings": CONTEXT_WINDOW,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **SHAPES[shape],
    }


def write_random_weights(config: dict[str, Any], dest: Path, quantize_bits: int) -> None:
    """Initialise the model class (lazy arrays), evaluate layer by layer, quantize, save."""
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.set_dtype(compute_dtype())
    for _, value in tree_flatten(model.parameters()):
        mx.eval(value)  # one array at a time: the float32 draws never all live at once
    if quantize_bits:
        nn.quantize(model, group_size=GROUP_SIZE, bits=quantize_bits)
        config = {**config, "quantization": {"group_size": GROUP_SIZE, "bits": quantize_bits}}
        mx.eval(model.parameters())
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(dest / "model.safetensors"), weights, {"format": "mlx"})
    (dest / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --quantize and --cache-dir, the same in every benchmark."""
    parser.add_argument("--model", default="tiny", help="see benchmarks/models.py")
    parser.add_argument("--quantize", type=int, default=0, choices=[0, 4, 8])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)


def vocab_size(tokenizer_dir: Path) -> int:
    """Base vocabulary plus added tokens, as `tokenizer.json` spells them."""
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    ids = [*spec["model"]["vocab"].values(), *(token["id"] for token in spec["added_tokens"])]
    return int(max(ids)) + 1


def copy_tokenizer(tokenizer_dir: Path, dest: Path) -> None:
    names = [tokenizer_dir / name for name in TOKENIZER_FILES]
    for source in [p for p in names if p.is_file()] + sorted(tokenizer_dir.glob("chat_template.*")):
        shutil.copy2(source, dest / source.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help=f"{', '.join(SHAPES)}, {BUNDLED}, a .gguf file or a dir")
    parser.add_argument("--quantize", type=int, default=0, choices=[0, 4, 8])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args()
    print(resolve_model(args.model, args.cache_dir, args.quantize))


if __name__ == "__main__":
    main()
