"""Text families beyond llama, one of each kind of layer cache mlx-lm has, served over real HTTP.

Each family answers a chat and a stream; four concurrent requests of different lengths each equal
mlx-lm's own single-sequence greedy generation (so padding, masks, positions and recurrent states
are right in the batch); a second turn that may reuse the first turn's cached state equals a cold
run. `--speculative ngram` and `--kv-bits 8` either work (speculation gives the same greedy
tokens; a quantized batch gives each row what it gets alone) or are refused at start-up with the
reason. The models are tiny, random and scaled up (text_family_factory), so a wrong position,
mask or state changes the greedy tokens.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from mlx_engine_server.engine import EngineClient, EngineOptions
from mlx_engine_server.engine.model_fit import check_plain_kv_cache
from mlx_engine_server.errors import StartupError

from ..conftest import LiveServer, run_live_server, start_engine
from ..text_family_factory import CONFIGS, build_text_family
from .test_families import MAX_TOKENS, answer_tokens, chat, greedy, post_all, user


@dataclass(frozen=True)
class Family:
    name: str
    caches: frozenset[str]  # the cache kinds of its layers: what decides the options it takes
    reads_quantized_kv: bool = True  # its attention goes through mlx-lm's quantized helper

    @property
    def plain(self) -> bool:
        return self.caches == {"KVCache"}


def family(name: str, *caches: str, reads_quantized_kv: bool = True) -> Family:
    return Family(name, frozenset(caches), reads_quantized_kv)


FAMILIES = [
    family("qwen3", "KVCache"),
    family("phi3", "KVCache"),  # partial rotary, fused projections
    family("glm4", "KVCache"),
    family("qwen3_moe", "KVCache"),  # experts
    # latent attention (MLA) over the cached latents; experts
    family("deepseek_v3", "KVCache", reads_quantized_kv=False),
    family("gemma3_text", "KVCache", "RotatingKVCache"),  # sliding-window layers
    family("ministral3", "KVCache", "RotatingKVCache"),
    family("gpt_oss", "KVCache", "RotatingKVCache"),  # and attention sinks, experts
    family("qwen3_next", "KVCache", "ArraysCache"),  # gated delta-net, experts
    family("lfm2", "KVCache", "ArraysCache"),  # short convolutions
    family("mamba2", "ArraysCache"),  # recurrent state only
    family("nemotron_h", "KVCache", "ArraysCache"),  # Mamba 2 beside attention
    family("jamba", "KVCache", "ArraysCache"),  # Mamba beside attention; prefilled alone
    family("falcon_h1", "CacheList"),  # attention and Mamba 2 in one layer
]


class Reference:
    """mlx-lm's own greedy generation, one sequence at a time, on the model as mlx-lm loads it."""

    def __init__(self, model_dir: Path, tokenizer: Any) -> None:
        from mlx_lm.utils import load_model

        self.model, _ = load_model(model_dir)
        self.tokenizer = tokenizer

    def tokens(self, body: dict[str, Any]) -> tuple[int, list[str]]:
        import mlx.core as mx
        from mlx_lm.generate import generate_step

        prompt = self.tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True)
        steps = generate_step(
            mx.array(prompt), self.model, max_tokens=body["max_tokens"], sampler=greedy
        )
        return len(prompt), [self.tokenizer.decode([int(token)]) for token, _ in steps]


@dataclass
class Served:
    family: Family
    model_dir: Path
    live: LiveServer
    engine: EngineClient
    reference: Reference


@pytest.fixture(scope="module")
def smollm_tokenizer(smollm_dir: Path) -> Any:
    """Every family's tokenizer is SmolLM2's: the references load it once."""
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(smollm_dir)


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda family: family.name)
def served(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    smollm_dir: Path,
    smollm_tokenizer: Any,
) -> Iterator[Served]:
    family: Family = request.param
    model_dir = build_text_family(family.name, tmp_path_factory.mktemp(family.name), smollm_dir)
    engine = start_engine(model_dir)
    live = run_live_server(engine)
    yield Served(family, model_dir, live, engine, Reference(model_dir, smollm_tokenizer))
    live.stop()
    engine.stop()


def assert_equals_mlx_lm(served: Served, body: dict[str, Any], reply: dict[str, Any]) -> None:
    prompt_tokens, expected = served.reference.tokens(body)
    assert reply["usage"]["prompt_tokens"] == prompt_tokens
    assert answer_tokens(reply) == expected


def test_the_cache_kinds_are_the_ones_swept(served: Served) -> None:
    """The sweep covers what it says: each family's layers have the caches listed for it."""
    from mlx_lm.models.cache import make_prompt_cache

    kinds = {type(layer).__name__ for layer in make_prompt_cache(served.reference.model)}
    assert kinds == served.family.caches


def test_chat_and_stream(served: Served) -> None:
    body = chat(user("Hello there"))
    reply = httpx.post(f"{served.live.base_url}/v1/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == MAX_TOKENS
    streamed = ""
    with httpx.stream(
        "POST",
        f"{served.live.base_url}/v1/chat/completions",
        json={**body, "stream": True},
        timeout=120,
    ) as events:
        assert events.status_code == 200
        lines = [line for line in events.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        for choice in json.loads(line.removeprefix("data: "))["choices"]:
            streamed += choice["delta"].get("content") or ""
    assert streamed == reply.json()["choices"][0]["message"]["content"]


BATCH = [
    chat(user("Tell me a story about a long journey across the sea, with ships"), max_tokens=8),
    chat(user("Why?"), max_tokens=3),
    chat(user("What is the capital of France?"), max_tokens=4),
    chat(user("Hi")),
]


async def post_staggered(base_url: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first body alone, the others while it decodes: they join a running batch."""

    async def later(body: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0.1)
        (reply,) = await post_all(base_url, [body])
        return reply

    return list(
        await asyncio.gather(post_all(base_url, bodies[:1]), *(later(b) for b in bodies[1:]))
    )


def test_four_concurrent_rows_equal_mlx_lm_alone(served: Served) -> None:
    """Prompts of four lengths prefilled together (right-padded) and joining a running batch,
    leaving it at different steps."""
    first, *others = asyncio.run(post_staggered(served.live.base_url, BATCH))
    for body, reply in zip(BATCH, [first[0], *others], strict=True):
        assert_equals_mlx_lm(served, body, reply)


def test_a_second_turn_equals_a_cold_run(served: Served) -> None:
    """The second turn starts from the first turn's cached state where that state is exact: an
    attention cache cut to the shared prefix, otherwise the state kept at the end of the first
    prompt; a prompt that branches earlier shares only what can be cut back; the second turn
    again (a regenerated answer) starts at least from the first turn."""
    first = chat(user("Describe the sea, please."))
    (reply,) = asyncio.run(post_all(served.live.base_url, [first]))
    answer = reply["choices"][0]["message"]["content"]
    second = chat(*first["messages"], {"role": "assistant", "content": answer}, user("Why?"))
    branch = chat(user("Describe the sky, please."))  # shares the system prompt only
    again, branched = asyncio.run(post_all(served.live.base_url, [second, branch]))
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= reply["usage"]["prompt_tokens"]
    assert_equals_mlx_lm(served, second, again)
    assert_equals_mlx_lm(served, branch, branched)
    (regenerated,) = asyncio.run(post_all(served.live.base_url, [second]))  # the same again
    cached = regenerated["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= reply["usage"]["prompt_tokens"]
    assert answer_tokens(regenerated) == answer_tokens(again)


SPECULATIVE = EngineOptions(speculative="ngram", num_draft_tokens=4, ngram_size=1)
KV_BITS = EngineOptions(kv_bits=8, kv_group_size=32)
COMPLETION_TOKENS = 16
CANDIDATES = 256
WORDS = ("red", "ox", "sea")


def complete(base_url: str, prompt: list[int]) -> list[str]:
    body = {"prompt": prompt, "max_tokens": COMPLETION_TOKENS, "temperature": 0, "logprobs": 1}
    response = httpx.post(f"{base_url}/v1/completions", json={**body, "ignore_eos": True})
    assert response.status_code == 200, response.text
    tokens: list[str] = response.json()["choices"][0]["logprobs"]["tokens"]
    return tokens


def complete_together(base_url: str, prompts: list[list[int]]) -> list[list[str]]:
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        return list(pool.map(lambda prompt: complete(base_url, prompt), prompts))


def prompts_that_draft(reference: Reference, wanted: int = 2) -> list[list[int]]:
    """Prompts of 600 distinct tokens whose first greedy token is one of them: prompt lookup
    (n-grams of one token) drafts at the first step, and the batch verifies the draft in one
    forward pass and rewinds what it rejects. Found with mlx-lm among prompts that differ in
    their last token only, all decoded at once over one prefill of the shared part."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    shared = list(range(1000, 1600))
    cache = make_prompt_cache(reference.model)
    reference.model(mx.array([shared]), cache=cache)
    for layer in cache:
        layer.keys = mx.repeat(layer.keys[..., : layer.offset, :], CANDIDATES, axis=0)
        layer.values = mx.repeat(layer.values[..., : layer.offset, :], CANDIDATES, axis=0)
    lasts = list(range(2000, 2000 + CANDIDATES))
    logits = reference.model(mx.array(lasts)[:, None], cache=cache)
    firsts: list[int] = mx.argmax(logits[:, -1], axis=-1).tolist()  # type: ignore[assignment]
    found = [
        [*shared, last]
        for last, first in zip(lasts, firsts, strict=True)
        if first in shared or first == last
    ]
    assert len(found) >= wanted, "no prompt would draft: prompt lookup would go untested"
    return found[:wanted]


def serve_with(served: Served, options: EngineOptions) -> LiveServer:
    return run_live_server(start_engine(served.model_dir, options))


def test_ngram_speculation_gives_the_same_tokens_or_is_refused(served: Served) -> None:
    if not served.family.plain:
        with pytest.raises(StartupError, match=rf"--speculative ngram .*'{served.family.name}'"):
            check_plain_kv_cache(served.reference.model, "--speculative ngram")
        return
    prompts = [*prompts_that_draft(served.reference), served.reference.tokenizer.encode("Hi")]
    live = serve_with(served, SPECULATIVE)
    try:
        speculated = complete_together(live.base_url, prompts)
        assert speculated == complete_together(served.live.base_url, prompts)
        status = httpx.get(f"{live.base_url}/v1/mlx/status").json()["speculative"]
        assert status["draft_tokens_total"] > 0
    finally:
        live.stop()
        live.engine.stop()


def test_quantized_kv_rows_equal_each_row_alone_or_are_refused(served: Served) -> None:
    if not served.family.plain:
        with pytest.raises(StartupError, match=rf"--kv-bits 8 .*'{served.family.name}'"):
            check_plain_kv_cache(served.reference.model, "--kv-bits 8")
        return
    if not served.family.reads_quantized_kv:
        refusal = rf"^--kv-bits 8 .* '{served.family.name}' model: its first pass over a quantized"
        with pytest.raises(StartupError, match=refusal):
            start_engine(served.model_dir, KV_BITS)
        return
    prompts = [served.reference.tokenizer.encode(f"The {word} is") for word in WORDS]
    live = serve_with(served, KV_BITS)
    try:
        together = complete_together(live.base_url, prompts)
        alone = [complete(live.base_url, prompt) for prompt in prompts]
        assert together == alone
    finally:
        live.stop()
        live.engine.stop()


@pytest.mark.parametrize(
    ("name", "options", "refusal"),
    [
        ("mamba2", SPECULATIVE, r"^--speculative ngram needs .* 'mamba2' model has ArraysCache"),
        ("gemma3_text", KV_BITS, r"^--kv-bits 8 needs .* 'gemma3_text' model has .*Rotating"),
        # Phi-3 mini's heads are 96 wide: groups of 64 do not divide them.
        (
            "phi3",
            EngineOptions(kv_bits=8, kv_group_size=64),
            r"^--kv-bits 8 \(group size 64\) does not fit this 'phi3' model: .*group size 64",
        ),
    ],
)
def test_options_a_family_cannot_take_are_refused_at_start_up(
    tmp_path: Path, smollm_dir: Path, name: str, options: EngineOptions, refusal: str
) -> None:
    model_dir = build_text_family(name, tmp_path / name, smollm_dir)
    with pytest.raises(StartupError, match=refusal):
        start_engine(model_dir, options)


def test_a_family_whose_cache_mlx_lm_cannot_batch_is_refused_by_name(
    tmp_path: Path, smollm_dir: Path
) -> None:
    """Llama 4's chunked attention (ChunkedKVCache) has no merge: every request would fail."""
    model_dir = build_text_family("llama4", tmp_path / "llama4", smollm_dir)
    refusal = r"^this 'llama4' model keeps ChunkedKVCache layers, which mlx-lm's BatchGenerator"
    with pytest.raises(StartupError, match=refusal):
        start_engine(model_dir)


def test_the_nemotron_h_workaround_follows_the_probe() -> None:
    """Applied where the installed mlx-lm drops the row lengths (0.32.2 does), and the fixed
    mixer passes the probe: an mlx-lm that hands them over is left alone."""
    from mlx_lm.models import nemotron_h

    from mlx_engine_server.models.batch_fixes import FIXES, batch_is_broken, fix_batched_layers

    fix = FIXES[nemotron_h.NemotronHMamba2Mixer]
    assert not batch_is_broken(fix.fixed)
    config = {"model_type": "nemotron_h", **CONFIGS["nemotron_h"](), "vocab_size": 8}
    model = nemotron_h.Model(nemotron_h.ModelArgs.from_dict(config))
    broken = batch_is_broken(nemotron_h.NemotronHMamba2Mixer)
    assert fix_batched_layers(model) == (1 if broken else 0)
    mixers = [layer.mixer for layer in model.layers if layer.block_type == "M"]
    assert all(type(mixer) is fix.fixed for mixer in mixers) == broken


def test_recurrent_families_whose_batched_prefill_is_wrong_prefill_alone() -> None:
    """The start-up probe runs mlx-lm's batch against each row alone: Mamba (1) ignores the
    row lengths in mlx-lm 0.32.2, Mamba 2 uses them; attention-only models are not probed."""
    import mlx_lm
    from mlx_lm.models import mamba, mamba2, qwen3

    from mlx_engine_server.engine.model_fit import batched_prefill_matches_rows, prefills_alone

    def tiny(module: Any, name: str) -> Any:
        config = {"model_type": name, **CONFIGS[name](), "vocab_size": 32}
        return module.Model(module.ModelArgs.from_dict(config))

    broken = not batched_prefill_matches_rows(tiny(mamba, "mamba"))
    assert broken or mlx_lm.__version__ != "0.32.2"  # the fault is there: the probe sees it
    assert prefills_alone(tiny(mamba, "mamba")) == broken
    assert not prefills_alone(tiny(mamba2, "mamba2"))
    assert not prefills_alone(tiny(qwen3, "qwen3"))
