"""Every family people run, as a new user would: a tiny random-weight model of each, served
over real HTTP.

Each family answers a chat and a stream, four concurrent requests (text and images mixed in
one batch) and a second turn that reuses the first one's cached prefix (same image again); every
batched answer is checked token by token against the family's own single-request generation
(mlx-lm's or mlx-vlm's), so a batch row that decodes with another row's mask or positions fails.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from mlx_engine_server.engine import EngineClient

from ..conftest import LiveServer, run_live_server, start_engine
from ..family_factory import build_tiny_gemma2

MAX_TOKENS = 5


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[Path, Path], Path]
    vision: bool = False


FAMILIES = [Family("gemma2", build_tiny_gemma2)]


@dataclass
class Served:
    family: Family
    model_dir: Path
    live: LiveServer
    engine: EngineClient
    reference: Any  # the family's own generation, loaded once


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda family: family.name)
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, smollm_dir: Path
) -> Iterator[Served]:
    family: Family = request.param
    model_dir = family.build(tmp_path_factory.mktemp(family.name) / family.name, smollm_dir)
    engine = start_engine(model_dir)
    live = run_live_server(engine)
    yield Served(family, model_dir, live, engine, TextReference(model_dir))
    live.stop()
    engine.stop()


class TextReference:
    """mlx-lm's own greedy generation, one sequence at a time."""

    def __init__(self, model_dir: Path) -> None:
        from mlx_lm.utils import load

        self.model, self.tokenizer = load(str(model_dir))

    def tokens(self, body: dict[str, Any]) -> list[str]:
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        prompt = self.tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True)
        steps = generate_step(
            mx.array(prompt), self.model, max_tokens=body["max_tokens"], sampler=greedy
        )
        return [self.tokenizer.decode([int(token)]) for token, _ in steps]


def greedy(logprobs: Any) -> Any:
    import mlx.core as mx

    return mx.argmax(logprobs, axis=-1)


def chat(text: str, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "user", "content": text}]
    body = {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
    return {**body, "ignore_eos": True, "logprobs": True, **extra}


def answer_tokens(reply: dict[str, Any]) -> list[str]:
    return [entry["token"] for entry in reply["choices"][0]["logprobs"]["content"]]


async def post_all(base_url: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        replies = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=body) for body in bodies)
        )
    for reply in replies:
        assert reply.status_code == 200, reply.text
    return [reply.json() for reply in replies]


def test_four_concurrent_rows_equal_the_family_generation(served: Served) -> None:
    bodies = [
        chat("Hello there"),
        chat("Tell me a story about a long journey across the sea"),
        chat("Why?"),
        chat("Count to ten, slowly, please"),
    ]
    replies = asyncio.run(post_all(served.live.base_url, bodies))
    for body, reply in zip(bodies, replies, strict=True):
        assert answer_tokens(reply) == served.reference.tokens(body)
