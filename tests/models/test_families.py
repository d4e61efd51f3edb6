"""Every family people run, as a new user would: a tiny random-weight model of each, served
over real HTTP.

Each family answers a chat and a stream, four concurrent requests (text and images mixed in
one batch) and a second turn that reuses the first one's cached prefix (same image again); every
batched answer is checked token by token against the family's own single-request generation
(mlx-lm's or mlx-vlm's), so a batch row that decodes with another row's mask or positions fails.
The tiny models' projections are scaled up (see family_factory) so that a wrong position or
mask changes the greedy tokens.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from PIL import Image
from starlette.testclient import TestClient

from mlx_engine_server.engine import EngineClient
from mlx_engine_server.errors import StartupError

from ..chat.test_media import image_bytes
from ..conftest import LiveServer, run_live_server, start_engine
from ..family_factory import (
    build_tiny_gemma2,
    build_tiny_gemma3,
    build_tiny_glm4v,
    build_tiny_llava,
    build_tiny_llava_next,
    build_tiny_mistral3,
    build_tiny_qwen2_5_vl,
    build_tiny_qwen2_vl,
    build_tiny_qwen3_vl,
)
from ..vision_factory import build_tiny_smolvlm

MAX_TOKENS = 5


@dataclass(frozen=True)
class Family:
    name: str
    build: Callable[[Path, Path], Path]
    vision: bool = True


# One family of each kind runs always; the others (the same paths again: M-RoPE, plain
# embeddings) carry the `families` marker, to leave out locally with -m "not families".
MORE = pytest.mark.families
FAMILIES = [
    Family("qwen2_vl", build_tiny_qwen2_vl),  # M-RoPE
    pytest.param(Family("qwen2_5_vl", build_tiny_qwen2_5_vl), marks=MORE),
    pytest.param(Family("qwen3_vl", build_tiny_qwen3_vl), marks=MORE),  # and deepstack
    pytest.param(Family("glm4v", build_tiny_glm4v), marks=MORE),
    Family("gemma3", build_tiny_gemma3),  # sliding-window layers, a mask for the images
    pytest.param(Family("mistral3", build_tiny_mistral3), marks=MORE),
    Family("llava", build_tiny_llava),
    pytest.param(Family("smolvlm", build_tiny_smolvlm), marks=MORE),
    Family("gemma2", build_tiny_gemma2, vision=False),  # mlx-lm's batch mask fault
]


@dataclass
class Served:
    family: Family
    live: LiveServer
    engine: EngineClient
    reference: TextReference | VisionReference


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda family: str(family.name))
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, smollm_dir: Path
) -> Iterator[Served]:
    family: Family = request.param
    model_dir = family.build(tmp_path_factory.mktemp(family.name) / family.name, smollm_dir)
    engine = start_engine(model_dir)
    live = run_live_server(engine)
    reference = VisionReference(model_dir) if family.vision else TextReference(model_dir)
    yield Served(family, live, engine, reference)
    live.stop()
    engine.stop()


def greedy(logprobs: Any) -> Any:
    import mlx.core as mx

    return mx.argmax(logprobs, axis=-1)


class TextReference:
    """mlx-lm's own greedy generation, one sequence at a time."""

    def __init__(self, model_dir: Path) -> None:
        from mlx_lm.utils import load

        self.model, self.tokenizer = load(str(model_dir))

    def tokens(self, body: dict[str, Any]) -> tuple[int, list[str]]:
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        prompt = self.tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True)
        steps = generate_step(
            mx.array(prompt), self.model, max_tokens=body["max_tokens"], sampler=greedy
        )
        return len(prompt), [self.tokenizer.decode([int(token)]) for token, _ in steps]


class VisionReference:
    """mlx-vlm's own single-request greedy generation, on the prompt its processor makes."""

    def __init__(self, model_dir: Path) -> None:
        import mlx.core as mx
        from mlx_vlm.utils import load

        self.model, self.processor = load(str(model_dir))
        self.model.set_dtype(mx.float32)
        self.tokenizer = self.processor.tokenizer

    def tokens(self, body: dict[str, Any]) -> tuple[int, list[str]]:
        import mlx.core as mx
        from mlx_vlm.generate.ar import generate_step

        from mlx_engine_server.models.vision import prepare_vision_prompt

        text = self.tokenizer.apply_chat_template(
            [_template_message(message) for message in body["messages"]],
            tokenize=False,
            add_generation_prompt=True,
        )
        images = [_image(url) for url in _image_urls(body)]
        if images:
            prompt = prepare_vision_prompt(self.processor, text, images, "reference")
            ids, arrays = prompt.token_ids, {k: mx.array(v) for k, v in prompt.arrays.items()}
        else:
            ids, arrays = tuple(self.tokenizer.encode(text, add_special_tokens=False)), {}
        input_ids = mx.array([ids])
        steps = generate_step(
            input_ids,
            self.model,
            arrays.pop("pixel_values", None),
            mx.ones(input_ids.shape, dtype=mx.int32),
            max_tokens=body["max_tokens"],
            temperature=0.0,
            **arrays,
        )
        return len(ids), [
            self.tokenizer.decode([int(token)])
            for (token, _), _ in zip(steps, range(body["max_tokens"]), strict=False)
        ]


def _template_message(message: dict[str, Any]) -> dict[str, Any]:
    """As the server renders a vision model's messages: content as a list of parts."""
    content = message["content"]
    if isinstance(content, str):
        return {"role": message["role"], "content": [{"type": "text", "text": content}]}
    parts = [part if part["type"] == "text" else {"type": "image"} for part in content]
    return {"role": message["role"], "content": parts}


def _image_urls(body: dict[str, Any]) -> list[str]:
    return [
        part["image_url"]["url"]
        for message in body["messages"]
        if not isinstance(message["content"], str)
        for part in message["content"]
        if part["type"] == "image_url"
    ]


def _image(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def data_uri(color: str, size: tuple[int, int] = (50, 40)) -> str:
    return "data:image/png;base64," + base64.b64encode(image_bytes("PNG", size, color)).decode()


def user(text: str, *colors: str) -> dict[str, Any]:
    if not colors:
        return {"role": "user", "content": text}
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": data_uri(color)}} for color in colors]
    return {"role": "user", "content": parts}


def chat(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    body = {"messages": list(messages), "max_tokens": MAX_TOKENS, "temperature": 0}
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


def assert_equals_reference(served: Served, body: dict[str, Any], reply: dict[str, Any]) -> None:
    prompt_tokens, expected = served.reference.tokens(body)
    assert reply["usage"]["prompt_tokens"] == prompt_tokens  # the same prompt, or no comparison
    assert answer_tokens(reply) == expected


def image_colors(served: Served, *colors: str) -> tuple[str, ...]:
    return colors if served.family.vision else ()


def test_chat_and_stream(served: Served) -> None:
    body = chat(user("What is in the picture?", *image_colors(served, "red")))
    reply = httpx.post(f"{served.live.base_url}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == MAX_TOKENS
    streamed = ""
    with httpx.stream(
        "POST", f"{served.live.base_url}/v1/chat/completions", json={**body, "stream": True}
    ) as events:
        assert events.status_code == 200
        lines = [line for line in events.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        for choice in json.loads(line.removeprefix("data: "))["choices"]:
            streamed += choice["delta"].get("content") or ""
    assert streamed == reply.json()["choices"][0]["message"]["content"]


def test_four_concurrent_mixed_rows_equal_the_family_generation(served: Served) -> None:
    """Rows join at different steps (an image prefills first) and leave at different steps."""
    bodies = [
        chat(user("What is in the picture?", *image_colors(served, "red"))),
        chat(user("Tell me a story about a long journey across the sea"), max_tokens=3),
        chat(user("And this one?", *image_colors(served, "blue")), max_tokens=4),
        chat(user("Why?")),
    ]
    replies = asyncio.run(post_all(served.live.base_url, bodies))
    for body, reply in zip(bodies, replies, strict=True):
        assert_equals_reference(served, body, reply)


def test_a_second_turn_reuses_the_cached_prefix(served: Served) -> None:
    first = chat(user("Describe the picture, please.", *image_colors(served, "green")))
    (reply,) = asyncio.run(post_all(served.live.base_url, [first]))
    answer = reply["choices"][0]["message"]["content"]
    second = chat(*first["messages"], {"role": "assistant", "content": answer}, user("Why?"))
    (again,) = asyncio.run(post_all(served.live.base_url, [second]))
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert_equals_reference(served, second, again)


def test_families_that_are_not_served_are_refused_by_name(tmp_path: Path, smollm_dir: Path) -> None:
    """Llama 3.2 Vision (cross-attention) before any weight is read; LLaVA-Next by its start-up
    probe (mlx-vlm merges more image positions than its processor places tokens)."""
    mllama = tmp_path / "mllama"
    mllama.mkdir()
    config = {"model_type": "mllama", "text_config": {}, "vision_config": {}}
    (mllama / "config.json").write_text(json.dumps(config), encoding="utf-8")
    names_both = r"Llama 3.2 Vision \(mllama.*LLaVA-Next \(llava_next"
    with pytest.raises(StartupError, match=rf"'mllama' family.*cross-attention.*{names_both}"):
        start_engine(mllama)
    llava_next = build_tiny_llava_next(tmp_path / "llava-next", smollm_dir)
    with pytest.raises(StartupError, match=rf"'llava_next' family.*positions.*{names_both}"):
        start_engine(llava_next)


def test_a_video_part_is_refused_with_a_400_naming_it(client: TestClient) -> None:
    """Video is not read (no video decoder, no frame sampling policy): a clear 400 before any
    model work, for the Qwen-VL families that take video in mlx-vlm as for every other."""
    video = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}
    body = chat({"role": "user", "content": [{"type": "text", "text": "What happens?"}, video]})
    reply = client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "messages[0].content[1]"
    assert "video_url" in error["message"]
    assert "image_url frames" in error["message"]


def test_the_gemma2_workaround_follows_the_probe() -> None:
    """Applied where the installed mlx-lm's attention fails the probe, and the fixed attention
    passes it: an mlx-lm whose attention behaves like the fixed one is left alone."""
    from mlx_lm.models import gemma2

    from mlx_engine_server.models.batch_fixes import (
        FIXES,
        batch_is_broken,
        fix_batched_layers,
    )

    args = {
        "model_type": "gemma2",
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "intermediate_size": 16,
        "num_attention_heads": 4,
        "head_dim": 4,
        "rms_norm_eps": 1e-6,
        "vocab_size": 8,
        "num_key_value_heads": 2,
    }
    model = gemma2.Model(gemma2.ModelArgs.from_dict(args))
    broken = batch_is_broken(gemma2.Attention)
    assert fix_batched_layers(model) == (2 if broken else 0)
    assert not batch_is_broken(FIXES[gemma2.Attention].fixed)
    fixed = [layer.self_attn for layer in model.model.layers]
    assert all(type(attention) is FIXES[gemma2.Attention].fixed for attention in fixed) == broken
