"""Shared fixtures: real models (a tiny random llama, the real SmolLM2), engines and servers."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx2 as httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.testclient import TestClient

from mlx_engine_server.engine import EngineClient, EngineOptions
from mlx_engine_server.engine.local import local_client
from mlx_engine_server.http.app import ServerOptions, create_app
from mlx_engine_server.models.gguf import convert_gguf
from mlx_engine_server.models.loader import ModelSource, load_model
from mlx_engine_server.state.store import StateStore

from .model_factory import (
    build_scripted_llama,
    build_tiny_llama,
    scripted_model,
    smollm_gguf_path,
    use_chat_template,
)

TINY_CONTEXT_WINDOW = 256

# No test may reach the network: Hugging Face lookups stay in the local cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def gguf_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def smollm_dir(gguf_cache: Path) -> Path:
    """SmolLM2-135M-Instruct converted from its GGUF, once per session."""
    return convert_gguf(smollm_gguf_path(), gguf_cache / "gguf")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm_dir: Path) -> Path:
    """A random-weight llama with SmolLM2's tokenizer and chat template; context 256 tokens."""
    dest = tmp_path_factory.mktemp("tiny-llama") / "tiny-llama"
    return build_tiny_llama(dest, smollm_dir, context_window=TINY_CONTEXT_WINDOW)


def start_engine(
    model_path: Path | str, options: EngineOptions | None = None, adapter_path: Path | None = None
) -> EngineClient:
    adapter = str(adapter_path) if adapter_path is not None else None
    source = ModelSource(model_path=str(model_path), adapter_path=adapter)
    engine = local_client(lambda: load_model(source), options or EngineOptions())
    engine.start()
    return engine


@pytest.fixture(scope="session")
def tiny_app(tiny_model_dir: Path) -> Iterator[Starlette]:
    engine = start_engine(tiny_model_dir)
    yield create_app(engine)
    engine.stop()


@pytest.fixture(scope="session")
def client(tiny_app: Starlette) -> Iterator[TestClient]:
    """In-process HTTP against the tiny model; one engine for the whole session."""
    with TestClient(tiny_app) as test_client:
        yield test_client


@pytest.fixture
def fresh_client(tiny_model_dir: Path) -> Iterator[TestClient]:
    """The tiny model on an engine of its own: an empty prefix cache, shared with no other test."""
    with TestClient(create_app(start_engine(tiny_model_dir))) as test_client:
        yield test_client


@dataclass
class LiveServer:
    """A real uvicorn server on a free loopback port, in a thread of this process."""

    base_url: str
    server: uvicorn.Server
    thread: threading.Thread
    engine: EngineClient
    sock: socket.socket

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def run_live_server(
    engine: EngineClient,
    options: ServerOptions | None = None,
    store: StateStore | None = None,
    **config: Any,
) -> LiveServer:
    """`config`: more uvicorn.Config arguments (root_path, h11_max_incomplete_event_size...);
    without a `store`, state is kept in memory."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uvicorn_config = uvicorn.Config(
        create_app(engine, options, store),
        log_level="warning",
        timeout_graceful_shutdown=2,
        **config,
    )
    server = uvicorn.Server(uvicorn_config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    return LiveServer(f"http://127.0.0.1:{port}", server, thread, engine, sock)


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir: Path) -> Iterator[LiveServer]:
    """Real HTTP over a socket: for concurrency, disconnects and the openai SDK."""
    live = run_live_server(start_engine(tiny_model_dir))
    yield live
    live.stop()


@pytest.fixture(scope="session")
def smollm_server(smollm_dir: Path) -> Iterator[LiveServer]:
    """The real SmolLM2-135M weights behind real HTTP: end-to-end truth."""
    live = run_live_server(start_engine(smollm_dir))
    yield live
    live.stop()


HERMES_ANSWER = '<tool_call>{"name":"lookup","arguments":{}}'


@pytest.fixture(scope="session")
def hermes_agent_server(
    tmp_path_factory: pytest.TempPathFactory, smollm_dir: Path
) -> Iterator[LiveServer]:
    """A scripted model whose greedy answer is HERMES_ANSWER (a call of `lookup`), behind a
    Hermes-style template: for the Anthropic and Responses protocol tests."""
    root = tmp_path_factory.mktemp("agent") / "scripted-hermes"
    model = scripted_model(root, smollm_dir, HERMES_ANSWER, "hermes_tools.jinja")
    live = run_live_server(start_engine(model))
    yield live
    live.stop()


BRACE_ANSWER = '{"'  # then a grammar decides, every other token tied: the lowest allowed id


def brace_model(root: Path, smollm_dir: Path, template: str | None) -> Path:
    """A scripted model that opens a JSON object, behind a fixture template (None: SmolLM2's
    own, which renders no tools): under a grammar it takes the JSON branch, never a marker's."""
    from transformers import AutoTokenizer

    if template is not None:
        return scripted_model(root, smollm_dir, BRACE_ANSWER, template)
    tokenizer = AutoTokenizer.from_pretrained(smollm_dir)
    script = tokenizer.encode(BRACE_ANSWER, add_special_tokens=False)
    prompt_end = [tokenizer.encode("\n")[-1]]
    return build_scripted_llama(root, smollm_dir, script, prompt_end, tokenizer.eos_token_id)


@pytest.fixture(scope="session")
def brace_hermes_server(
    tmp_path_factory: pytest.TempPathFactory, smollm_dir: Path
) -> Iterator[LiveServer]:
    """BRACE_ANSWER behind a Hermes-style template: a response_format's JSON, not a call."""
    model = brace_model(
        tmp_path_factory.mktemp("brace") / "hermes", smollm_dir, "hermes_tools.jinja"
    )
    live = run_live_server(start_engine(model))
    yield live
    live.stop()


@pytest.fixture(scope="session")
def random_hermes_agent_server(
    tmp_path_factory: pytest.TempPathFactory, smollm_dir: Path
) -> Iterator[LiveServer]:
    """Random weights behind a tool template: a forced call must still match its schema."""
    model = build_tiny_llama(tmp_path_factory.mktemp("agent-rnd") / "random-hermes", smollm_dir)
    live = run_live_server(start_engine(use_chat_template(model, "hermes_tools.jinja")))
    yield live
    live.stop()


_open_clients: list[Any] = []
ClientT = TypeVar("ClientT")


def close_after_test(client: ClientT) -> ClientT:
    """An SDK client whose pooled connections are closed when the test ends."""
    _open_clients.append(client)
    return client


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Closed with the test, not left to the garbage collector."""
    yield
    while _open_clients:
        _open_clients.pop().close()


def chat_on_live(live: LiveServer, **fields: Any) -> dict[str, Any]:
    """A chat completion from a live server, which must answer 200."""
    response = httpx.post(f"{live.base_url}/v1/chat/completions", json=fields)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer
