"""Finding and loading the one model: directories, repo ids, adapters, and clear start-up errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import mlx.core as mx
import pytest
from starlette.testclient import TestClient

from mlx_engine_server.engine import EngineClient
from mlx_engine_server.errors import StartupError
from mlx_engine_server.http.app import create_app
from mlx_engine_server.models.loader import ModelSource, load_model, resolve_model_path

from ..conftest import start_engine
from ..model_factory import build_lora_adapter


def greedy_text(engine: EngineClient) -> str:
    body = {"prompt": "Adapters change answers", "max_tokens": 8, "temperature": 0}
    with TestClient(create_app(engine)) as client:
        response = client.post("/v1/completions", json=body)
        status = client.get("/v1/mlx/status").json()
    assert response.status_code == 200, response.text
    assert status["model"]["adapter_path"] == engine.model.adapter_path
    return str(response.json()["choices"][0]["text"])


def start_with_adapter(model_dir: Path, adapter: Path) -> EngineClient:
    return start_engine(model_dir, adapter_path=adapter)


def test_lora_adapter_is_applied(tiny_model_dir: Path, tmp_path: Path) -> None:
    adapter = build_lora_adapter(tmp_path / "adapter", tiny_model_dir)
    base = greedy_text(start_engine(tiny_model_dir))
    adapted = greedy_text(start_with_adapter(tiny_model_dir, adapter))
    assert adapted != base


def test_missing_adapter_is_a_startup_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="not a directory"):
        start_with_adapter(tiny_model_dir, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StartupError, match=r"adapter_config\.json"):
        start_with_adapter(tiny_model_dir, tmp_path / "empty")


def test_mismatched_adapter_is_a_startup_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    adapter = build_lora_adapter(tmp_path / "adapter", tiny_model_dir)
    weights = mx.load(str(adapter / "adapters.safetensors"))
    wrong = {
        name: mx.zeros((value.shape[0] + 3, value.shape[1])) for name, value in weights.items()
    }
    mx.save_safetensors(str(adapter / "adapters.safetensors"), wrong)
    with pytest.raises(StartupError, match="could not load adapter"):
        start_with_adapter(tiny_model_dir, adapter)


def test_bad_model_paths_are_startup_errors(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="not found"):
        resolve_model_path(ModelSource(model_path=str(tmp_path / "missing")))
    with pytest.raises(StartupError, match=r"no config\.json"):
        resolve_model_path(ModelSource(model_path=str(tmp_path)))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(StartupError, match=r"config\.json"):
        load_model(ModelSource(model_path=str(broken)))


def fake_hub_cache(cache: Path, repo_id: str, model_dir: Path) -> None:
    """A Hugging Face cache entry, laid out as huggingface_hub writes one."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit, encoding="utf-8")


def test_repo_id_is_served_from_the_local_cache_without_network(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake_hub_cache(tmp_path, "tiny-org/tiny-llama", tiny_model_dir)
    engine = start_engine("tiny-org/tiny-llama")
    loaded = engine.model
    try:
        assert loaded.model_id == "tiny-org/tiny-llama"
        config = json.loads((Path(loaded.resolved_path) / "config.json").read_text())
        assert config["hidden_size"] == 64
    finally:
        engine.stop()
    with pytest.raises(StartupError, match="HF_HUB_OFFLINE"):
        resolve_model_path(ModelSource(model_path="tiny-org/not-cached"))
