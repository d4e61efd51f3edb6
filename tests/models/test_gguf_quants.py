"""GGUF tensor types: K-quant blocks written here decode with gguf-py to what they mean, the
converter holds gguf-py's weights (not `mx.load`'s), Q4_0/Q4_1/Q8_0 are repacked bit for bit,
and `--gguf-requantize` picks the bits."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, cast

import httpx2 as httpx
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType
from gguf import GGUFReader, quants

from mlx_engine_server.errors import StartupError
from mlx_engine_server.models.gguf import convert_gguf
from mlx_engine_server.models.gguf_quants import SourceTensor, repack_legacy, to_mlx
from mlx_engine_server.models.loader import ModelSource, load_model

from ..cli.test_cli import (
    MLX_SERVER,
    ServerProcess,
    clean_env,
    free_port,
    wait_until_healthy,
)
from ..gguf_factory import quantize, write_gguf, write_tiny_model

K_TYPES = [QType.Q4_K, QType.Q5_K, QType.Q6_K]
LEGACY_TYPES = [QType.Q4_0, QType.Q4_1, QType.Q8_0]


def random_weights(rows: int = 4, cols: int = 512, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, cols)).astype(np.float32) * 0.1


@pytest.mark.parametrize("qtype", K_TYPES, ids=lambda q: q.name)
def test_k_blocks_written_here_decode_to_what_they_mean(qtype: QType) -> None:
    weights = random_weights()
    raw, meant = quantize(weights, qtype)
    assert raw.dtype == np.uint8
    assert raw.shape == (4, 2 * quants.GGML_QUANT_SIZES[qtype][1])  # two blocks a row
    assert np.array_equal(quants.dequantize(raw, qtype), meant)
    assert np.abs(meant - weights).max() < 0.2 * np.abs(weights).max()  # a real quantization


@pytest.mark.parametrize("setting", ["auto", "4", "8", "none"])
def test_q4_k_is_repacked_without_loss(setting: Any) -> None:
    """Q4_K's 32-weight sub-blocks are MLX's 4-bit groups: gguf-py's weights, exactly."""
    raw, meant = quantize(random_weights(), QType.Q4_K)
    packed = to_mlx(SourceTensor("w", QType.Q4_K, raw), setting)
    restored = mx.dequantize(*packed.values(), group_size=32, bits=4)
    assert np.array_equal(np.array(restored), meant)


@pytest.mark.parametrize("qtype", [QType.Q5_K, QType.Q6_K], ids=lambda q: q.name)
def test_k_quants_hold_gguf_py_weights_after_requantizing(qtype: QType) -> None:
    """8 bits keep gguf-py's weights to within an 8-bit step."""
    raw, meant = quantize(random_weights(), qtype)
    packed = to_mlx(SourceTensor("w", qtype, raw), "8")
    assert packed["weight"].dtype == mx.uint32
    restored = np.array(mx.dequantize(*packed.values(), group_size=32, bits=8))
    group_range = np.ptp(meant.reshape(-1, 32), axis=1).max()
    assert np.abs(restored - meant).max() <= group_range / 255  # one 8-bit step


def test_mx_load_misreads_q4_k(tmp_path: Path) -> None:
    """Why K-quants bypass `mx.load`. If this starts failing, MLX fixed its decoder."""
    tiny = write_gguf(tmp_path / "k.gguf", "llama", {}, {"w": (random_weights(), QType.Q4_K)})
    loaded = cast("dict[str, mx.array]", mx.load(str(tiny.path)))
    error = np.abs(np.array(loaded["w"].astype(mx.float32)) - tiny.meant["w"]).max()
    assert error > 0.05


@pytest.mark.parametrize("qtype", LEGACY_TYPES, ids=lambda q: q.name)
def test_legacy_types_repack_bit_for_bit(tmp_path: Path, qtype: QType) -> None:
    """The same arrays `mx.load` makes, and exactly gguf-py's weights once dequantized."""
    tiny = write_gguf(tmp_path / "l.gguf", "llama", {}, {"w.weight": (random_weights(), qtype)})
    (tensor,) = GGUFReader(tiny.path).tensors
    ours = repack_legacy(tensor.data, qtype)
    theirs = cast("dict[str, mx.array]", mx.load(str(tiny.path)))
    assert mx.array_equal(ours["weight"], theirs["w.weight"]).item()
    for part in ("scales", "biases"):
        assert mx.array_equal(ours[part], theirs[f"w.{part}"].astype(mx.float32)).item()
    bits = 8 if qtype == QType.Q8_0 else 4
    restored = mx.dequantize(*ours.values(), group_size=32, bits=bits)
    assert np.array_equal(np.array(restored), tiny.meant["w.weight"])


def quantization_after(path: Path, cache: Path, requantize: Any) -> dict[str, Any] | None:
    model_dir = convert_gguf(path, cache, requantize)
    config = json.loads((model_dir / "config.json").read_text())
    quantization: dict[str, Any] | None = config.get("quantization")
    return quantization


def test_requantize_setting_picks_the_bits(tmp_path: Path) -> None:
    """Q4_K_M: Q4_K matrices (kept 4-bit, exactly) and Q6_K ones (V, FFN down, embeddings)."""
    path = write_tiny_model(tmp_path / "m.gguf", "qwen3", "Q4_K_M").path
    cache = tmp_path / "cache"
    v_proj, embeddings = "model.layers.0.self_attn.v_proj", "model.embed_tokens"
    auto = quantization_after(path, cache, "auto")
    assert auto is not None
    assert auto["bits"] == 4
    assert auto[v_proj]["bits"] == auto[embeddings]["bits"] == 8
    four = quantization_after(path, cache, "4")
    assert four is not None
    assert four["bits"] == 4
    assert not any(isinstance(entry, dict) for entry in four.values())
    none = quantization_after(path, cache, "none")  # Q6_K as floats, as gguf-py decodes them
    assert none is not None
    assert none["bits"] == 4
    assert none[v_proj] is False
    assert none[embeddings] is False
    q5 = write_tiny_model(tmp_path / "q5.gguf", "qwen3", "Q5_K_M").path
    assert (quantization_after(q5, cache, "auto") or {})["bits"] == 8
    assert (quantization_after(q5, cache, "4") or {})["bits"] == 4
    assert len([d for d in cache.iterdir() if d.is_dir()]) == 5  # one conversion per setting


def test_status_shows_the_requantized_model(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "m.gguf", "qwen3", "Q6_K").path
    source = ModelSource(model_path=str(path), cache_dir=tmp_path, gguf_requantize="4")
    assert load_model(source).quantization == "4-bit affine, group size 32"
    unknown = ModelSource(model_path=str(path), cache_dir=tmp_path, gguf_requantize="3")
    with pytest.raises(StartupError, match="--gguf-requantize '3' is not one of auto, 4, 8, none"):
        load_model(unknown)


def test_mlx_server_process_takes_the_setting_from_the_environment(tmp_path: Path) -> None:
    """Through the real command and its engine process: the env var reaches the converter."""
    path = write_tiny_model(tmp_path / "m.gguf", "qwen3", "Q6_K").path
    port = free_port()
    env = clean_env(MLX_SERVER_GGUF_REQUANTIZE="4")
    args = [MLX_SERVER, str(path), "--port", str(port), "--cache-dir", str(tmp_path / "cache")]
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(args, env=env, stdout=log, stderr=log)
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_until_healthy(server)
        status = httpx.get(f"{server.base_url}/v1/mlx/status", timeout=10).json()
        assert status["model"]["quantization"] == "4-bit affine, group size 32"
        assert status["model"]["resolved_path"].endswith("-requantize-4")
    finally:
        process.kill()
        process.wait(timeout=10)
