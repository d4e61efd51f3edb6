"""GGUF files of each supported architecture and the quant types people download, written
offline, served over real HTTP: greedy text equals the same weights loaded directly as an
mlx-lm model (named, shaped and re-quantized by hand in tests/gguf_factory.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType
from mlx import nn
from mlx_lm.generate import generate_step
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import _get_classes, load, load_tokenizer

from mlx_engine_server.engine import EngineOptions
from mlx_engine_server.engine.local import local_client
from mlx_engine_server.errors import StartupError
from mlx_engine_server.models.gguf import convert_gguf
from mlx_engine_server.models.gguf_arch import ARCHITECTURES, model_config
from mlx_engine_server.models.loader import ModelSource, load_model, read_model_config

from ..conftest import LiveServer, run_live_server
from ..gguf_factory import (
    CHATML,
    CONFIG_TENSORS,
    HEAD_DIM,
    LLAMA3_ROPE,
    TinyGGUF,
    llama3_rope_freqs,
    reference_config,
    reference_weights,
    tiny_metadata,
    write_tiny_model,
)

# (architecture, the file's quant scheme, what /v1/mlx/status says once converted with "auto")
CASES = [
    ("llama", "Q4_K_M", "4-bit affine, group size 32; some layers 8-bit"),  # Mistral's arch too
    ("llama3", "Q4_K_M", "4-bit affine, group size 32; some layers 8-bit"),  # + rope_freqs
    ("qwen2", "Q5_K_M", "8-bit affine, group size 32"),
    ("qwen3", "Q6_K", "8-bit affine, group size 32"),
    ("gemma2", "Q4_K_M", "4-bit affine, group size 32; some layers 8-bit"),
    ("gemma3", "Q4_0", "4-bit affine, group size 32; some layers 8-bit"),
    ("phi3", "Q4_K_M", "4-bit affine, group size 32; some layers 8-bit"),
    ("phi3_long", "Q5_K_M", "8-bit affine, group size 32"),  # LongRoPE factors as tensors
]
PROMPT_IDS = [1, 60, 3, 70, 80, 90, 100, 110]
MAX_TOKENS = 8
_AUTO_BITS = {QType.Q5_K: 8, QType.Q6_K: 8}


def reference_model(tiny: TinyGGUF, arch: str) -> nn.Module:
    """The file's weights as mlx-lm's own model; Q5_K and Q6_K matrices quantized as "auto"
    does, Q4_K, Q4_0 and Q8_0 ones kept as the floats they exactly hold."""
    config = reference_config(arch)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    weights = {name: mx.array(value) for name, value in reference_weights(tiny, arch).items()}
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    model.load_weights(list(weights.items()))
    bits_by_layer = _reference_bits(tiny, arch)

    def predicate(path: str, _: nn.Module) -> dict[str, Any] | bool:
        bits = bits_by_layer.get(path)
        return False if bits is None else {"group_size": 32, "bits": bits, "mode": "affine"}

    nn.quantize(model, class_predicate=predicate)
    return model


def _reference_bits(tiny: TinyGGUF, arch: str) -> dict[str, int]:
    weights = [name for name in tiny.meant if name not in CONFIG_TENSORS]
    named = dict(zip(weights, reference_weights(tiny, arch), strict=True))
    return {
        named[name].removesuffix(".weight"): _AUTO_BITS[qtype]
        for name, qtype in tiny.qtypes.items()
        if qtype in _AUTO_BITS
    }


def assert_same_logits(converted: nn.Module, reference: nn.Module) -> None:
    """Greedy text alone can miss a wrong norm scale; the logits cannot."""
    prompt = mx.array([PROMPT_IDS])
    ours, theirs = np.array(converted(prompt)), np.array(reference(prompt))
    assert np.abs(ours - theirs).max() < 1e-3 * np.abs(theirs).max()


def reference_text(model: nn.Module, tokenizer: TokenizerWrapper, prompt: list[int]) -> str:
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    steps = generate_step(mx.array(prompt), model, max_tokens=MAX_TOKENS)  # greedy
    for token, _ in steps:
        if int(token) in tokenizer.eos_token_ids:
            break
        detokenizer.add_token(int(token))
    detokenizer.finalize()
    return str(detokenizer.text)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf-archs")


@pytest.fixture(params=CASES, ids=[f"{arch}-{scheme}" for arch, scheme, _ in CASES])
def served(request: pytest.FixtureRequest, cache_dir: Path) -> Iterator[tuple[Any, LiveServer]]:
    arch, scheme, _ = request.param
    tiny = write_tiny_model(cache_dir / f"{arch}-{scheme}.gguf", arch, scheme)
    source = ModelSource(model_path=str(tiny.path), cache_dir=cache_dir)
    engine = local_client(lambda: load_model(source), EngineOptions())
    engine.start()
    live = run_live_server(engine)
    yield (request.param, tiny), live
    live.stop()
    engine.stop()


def completion_text(live: LiveServer, prompt: list[int] | str) -> str:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    response = httpx.post(f"{live.base_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


def test_greedy_text_equals_mlx_lm_on_the_same_weights(
    served: tuple[Any, LiveServer],
) -> None:
    ((arch, _, quantization), tiny), live = served
    status = httpx.get(f"{live.base_url}/v1/mlx/status").json()
    assert status["model"]["quantization"] == quantization
    resolved = Path(status["model"]["resolved_path"])
    converted = read_model_config(resolved)
    assert converted.get("rope_scaling") == reference_config(arch).get("rope_scaling")
    tokenizer = load_tokenizer(resolved)
    reference = reference_model(tiny, arch)
    assert_same_logits(load(str(resolved))[0], reference)
    assert completion_text(live, PROMPT_IDS) == reference_text(reference, tokenizer, PROMPT_IDS)
    assert tokenizer.chat_template == CHATML
    chat = httpx.post(
        f"{live.base_url}/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        },
        timeout=60,
    )
    assert chat.status_code == 200, chat.text
    rendered = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    prompt = tokenizer.encode(rendered, add_special_tokens=False)
    chat_text = chat.json()["choices"][0]["message"]["content"] or ""
    assert chat_text == reference_text(reference, tokenizer, prompt)


def test_rope_freqs_of_no_llama3_scaling_are_refused() -> None:
    metadata = tiny_metadata("llama3")
    llama = ARCHITECTURES["llama"]
    matching = model_config(llama, metadata, True, {"rope_freqs.weight": llama3_rope_freqs()})
    assert matching["rope_scaling"] == LLAMA3_ROPE
    with pytest.raises(StartupError, match=r"'rope_freqs\.weight' matches no Llama 3 RoPE scaling"):
        model_config(llama, metadata, True, {"rope_freqs.weight": [1.0] * (HEAD_DIM // 2)})


SENTENCEPIECE = {
    "tokenizer.ggml.model": "llama",
    "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "\u2581", "h", "i", "\u2581h", "\u2581hi"],
    "tokenizer.ggml.scores": [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0],
    "tokenizer.ggml.token_type": [2, 3, 3, 1, 1, 1, 1, 1],
    "tokenizer.ggml.bos_token_id": 1,
    "tokenizer.ggml.eos_token_id": 2,
    "tokenizer.ggml.unknown_token_id": 0,
}


@pytest.mark.parametrize(
    ("arch", "hi_ids"),
    [("gemma2", [1, 4, 5]), ("phi3", [1, 7])],  # Gemma adds no space before the text
)
def test_sentencepiece_vocabularies_build_by_architecture(
    cache_dir: Path, arch: str, hi_ids: list[int]
) -> None:
    """Gemma's and Phi-3's files carry sentencepiece vocabularies, built per architecture."""
    path = write_tiny_model(cache_dir / f"{arch}-sp.gguf", arch, "Q8_0", tokenizer=SENTENCEPIECE)
    tokenizer = load_tokenizer(convert_gguf(path.path, cache_dir / "sp"))
    assert tokenizer.encode("hi") == hi_ids
    assert tokenizer.encode(" hi")[-1] == 7  # ▁hi
    assert tokenizer.eos_token_id == 2


def test_partial_rotary_and_yarn_come_from_the_metadata() -> None:
    """Phi-4-mini (phi3 in GGUF) rotates 3/4 of each head; Qwen's long files use YaRN."""
    phi = tiny_metadata("phi3") | {"phi3.rope.dimension_count": HEAD_DIM * 3 // 4}
    assert model_config(ARCHITECTURES["phi3"], phi, True)["partial_rotary_factor"] == 0.75
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    qwen = tiny_metadata("qwen2") | {
        "qwen2.rope.scaling.type": "yarn",
        "qwen2.rope.scaling.factor": 4.0,
        "qwen2.rope.scaling.original_context_length": 32768,
    }
    assert model_config(ARCHITECTURES["qwen2"], qwen, True)["rope_scaling"] == yarn
    qwen["qwen2.rope.scaling.type"] = "longrope"
    with pytest.raises(StartupError, match="RoPE scaling 'longrope' is not supported"):
        model_config(ARCHITECTURES["qwen2"], qwen, True)
