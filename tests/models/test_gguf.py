"""GGUF conversion: real SmolLM2 weights answer "Paris", the cache is reused, bad files
fail with a StartupError that says why, and the tiny random llama the suite uses loads."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm import generate
from mlx_lm.utils import load

from mlx_engine_server.errors import StartupError
from mlx_engine_server.models.gguf import HASH_INDEX_NAME, convert_gguf, is_gguf_file

from ..model_factory import build_tiny_llama, smollm_gguf_path

SP_TOKENS = ["<unk>", "<s>", "</s>", "\u2581", "h", "i", "\u2581h", "\u2581hi"]


@pytest.fixture(scope="module")
def own_cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf-cache")


@pytest.fixture(scope="module")
def converted_smollm(own_cache_root: Path) -> Path:
    """Converted here, into a cache of this module's own, so the cache tests see it."""
    return convert_gguf(smollm_gguf_path(), own_cache_root)


def tiny_llama_tensors(hidden: int = 8, vocab: int = len(SP_TOKENS)) -> dict[str, mx.array]:
    """llama.cpp-named float32 tensors of a one-layer llama (2 heads, 1 KV head)."""
    mx.random.seed(0)
    shapes = {
        "token_embd.weight": (vocab, hidden),
        "output_norm.weight": (hidden,),
        "blk.0.attn_norm.weight": (hidden,),
        "blk.0.ffn_norm.weight": (hidden,),
        "blk.0.attn_q.weight": (hidden, hidden),
        "blk.0.attn_k.weight": (hidden // 2, hidden),
        "blk.0.attn_v.weight": (hidden // 2, hidden),
        "blk.0.attn_output.weight": (hidden, hidden),
        "blk.0.ffn_gate.weight": (2 * hidden, hidden),
        "blk.0.ffn_up.weight": (2 * hidden, hidden),
        "blk.0.ffn_down.weight": (hidden, 2 * hidden),
    }
    return {name: mx.random.normal(shape) * 0.1 for name, shape in shapes.items()}


def tiny_llama_metadata(architecture: str = "llama") -> dict[str, Any]:
    """Metadata of `tiny_llama_tensors` with a SentencePiece ("llama") vocabulary."""

    def u32(value: int) -> mx.array:
        return mx.array(value, dtype=mx.uint32)

    return {
        "general.architecture": architecture,
        f"{architecture}.embedding_length": u32(8),
        f"{architecture}.block_count": u32(1),
        f"{architecture}.feed_forward_length": u32(16),
        f"{architecture}.attention.head_count": u32(2),
        f"{architecture}.attention.head_count_kv": u32(1),
        f"{architecture}.context_length": u32(64),
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": SP_TOKENS,
        "tokenizer.ggml.scores": mx.array([0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0]),
        "tokenizer.ggml.token_type": mx.array([2, 3, 3, 1, 1, 1, 1, 1], dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": u32(1),
        "tokenizer.ggml.eos_token_id": u32(2),
        "tokenizer.ggml.unknown_token_id": u32(0),
    }


def gguf_metadata(path: Path) -> dict[str, Any]:
    _, metadata = cast("tuple[object, dict[str, Any]]", mx.load(str(path), return_metadata=True))
    return metadata


def load_mlx_lm(path: Path) -> tuple[Any, Any]:
    """`(model, tokenizer)` as `mlx_lm.utils.load` gives them."""
    loaded = load(str(path))
    return loaded[0], loaded[1]


def write_gguf(path: Path, tensors: dict[str, mx.array], metadata: dict[str, Any]) -> Path:
    mx.save_gguf(str(path), tensors, metadata)
    return path


def chat_prompt(tokenizer: Any, question: str) -> str:
    messages = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert isinstance(prompt, str)
    return prompt


@pytest.mark.smollm
def test_smollm_answers_paris(converted_smollm: Path) -> None:
    model, tokenizer = load_mlx_lm(converted_smollm)
    prompt = chat_prompt(tokenizer, "What is the capital of France?")
    answer = generate(model, tokenizer, prompt, max_tokens=20)
    assert "Paris" in answer


@pytest.mark.smollm
def test_tokenizer_follows_the_gguf_vocabulary(converted_smollm: Path) -> None:
    _, tokenizer = load_mlx_lm(converted_smollm)
    tokens = gguf_metadata(smollm_gguf_path())["tokenizer.ggml.tokens"]
    assert tokenizer.encode("Hello world") == [tokens.index("Hello"), tokens.index("\u0120world")]
    assert tokenizer.encode("<|im_start|>") == [tokens.index("<|im_start|>")]
    assert tokenizer.eos_token_id == tokens.index("<|im_end|>")
    assert tokenizer.encode("2024") == [tokens.index(digit) for digit in "2024"]


@pytest.mark.smollm
def test_second_call_reuses_the_cache(converted_smollm: Path, own_cache_root: Path) -> None:
    weights_mtime_ns = (converted_smollm / "model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    again = convert_gguf(smollm_gguf_path(), own_cache_root)
    assert again == converted_smollm
    assert time.perf_counter() - started < 1.0
    assert (converted_smollm / "model.safetensors").stat().st_mtime_ns == weights_mtime_ns
    assert (own_cache_root / HASH_INDEX_NAME).is_file()


def test_is_gguf_file(tmp_path: Path) -> None:
    assert is_gguf_file(smollm_gguf_path())
    assert not is_gguf_file(tmp_path)
    assert not is_gguf_file(tmp_path / "missing.gguf")


def test_random_bytes_are_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_bytes(bytes(range(256)) * 16)
    with pytest.raises(StartupError, match="not a readable GGUF"):
        convert_gguf(bad, tmp_path / "cache")


def test_missing_file_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="does not exist"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "cache")


def test_unsupported_architecture_is_rejected(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", tiny_llama_tensors(), tiny_llama_metadata("mamba"))
    with pytest.raises(
        StartupError,
        match="architecture 'mamba' is not supported; supported: llama, qwen2, qwen3, gemma2, "
        "gemma3, phi3",
    ):
        convert_gguf(path, tmp_path / "cache")


def test_unsupported_tensor_type_names_the_tensor(tmp_path: Path) -> None:
    tensors = tiny_llama_tensors()
    tensors["blk.0.ffn_up.weight"] = tensors["blk.0.ffn_up.weight"].astype(mx.int32)
    path = write_gguf(tmp_path / "m.gguf", tensors, tiny_llama_metadata())
    cache = tmp_path / "cache"
    with pytest.raises(StartupError, match=r"'blk\.0\.ffn_up\.weight' has type I32, which cannot"):
        convert_gguf(path, cache)
    assert [p.name for p in cache.iterdir()] == [HASH_INDEX_NAME]  # no half-written cache


def test_missing_tokenizer_is_rejected(tmp_path: Path) -> None:
    metadata = tiny_llama_metadata()
    del metadata["tokenizer.ggml.tokens"]
    path = write_gguf(tmp_path / "m.gguf", tiny_llama_tensors(), metadata)
    with pytest.raises(StartupError, match="no tokenizer"):
        convert_gguf(path, tmp_path / "cache")


def test_sentencepiece_llama_converts(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", tiny_llama_tensors(), tiny_llama_metadata())
    model, tokenizer = load_mlx_lm(convert_gguf(path, tmp_path / "cache"))
    assert tokenizer.encode("hi") == [SP_TOKENS.index("<s>"), SP_TOKENS.index("\u2581hi")]
    logits = model(mx.array([[1, 7]]))
    assert logits.shape == (1, 2, len(SP_TOKENS))


@pytest.mark.smollm
def test_tiny_llama_loads_and_generates(converted_smollm: Path, tmp_path: Path) -> None:
    first = build_tiny_llama(tmp_path / "a", converted_smollm, context_window=256, seed=3)
    second = build_tiny_llama(tmp_path / "b", converted_smollm, context_window=256, seed=3)
    model, tokenizer = load_mlx_lm(first)
    assert model.args.max_position_embeddings == 256
    assert generate(model, tokenizer, chat_prompt(tokenizer, "hi"), max_tokens=5)
    weights_a = dict(tree_flatten(model.parameters()))
    weights_b = cast("dict[str, mx.array]", mx.load(str(second / "model.safetensors")))
    assert all(mx.array_equal(weights_a[name], weights_b[name]) for name in weights_b)


def test_conversion_logs_its_phases(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A line per phase with sizes, and (stderr is no terminal here) plain progress lines."""
    path = write_gguf(tmp_path / "m.gguf", tiny_llama_tensors(), tiny_llama_metadata())
    with caplog.at_level(logging.INFO, logger="mlx_engine_server.models"):
        convert_gguf(path, tmp_path / "cache")
        first = [record.getMessage() for record in caplog.records]
        caplog.clear()
        convert_gguf(path, tmp_path / "cache")
    assert any(
        re.fullmatch(r"hashing m\.gguf \(\d+\.\d KB\) to find its converted copy", m) for m in first
    )
    assert "hashing m.gguf: 100% " in "\n".join(first)
    assert any(re.fullmatch(r"converting 11 tensors \(.+\) to float32", m) for m in first)
    assert "converting tensors: 50% " in "\n".join(first)
    assert "writing model.safetensors" in first
    assert f"building the tokenizer ({len(SP_TOKENS)} tokens)" in first
    assert any(m.startswith("converted m.gguf in ") for m in first)
    again = [record.getMessage() for record in caplog.records]
    assert len(again) == 1
    assert again[0].endswith(", converted before")


def test_conversion_is_silent_at_warning_level(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`--quiet` sets the level to warning: no phase lines and no progress."""
    path = write_gguf(tmp_path / "m.gguf", tiny_llama_tensors(), tiny_llama_metadata())
    with caplog.at_level(logging.WARNING):
        convert_gguf(path, tmp_path / "cache")
    assert caplog.records == []
