"""Speculative decoding (prompt lookup) over real HTTP, batched: the answers are the ones the
engine gives without it, and the drafted and accepted tokens are counted."""

from __future__ import annotations

import importlib
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import httpx2 as httpx
import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import BatchGenerator
from openai import OpenAI

from mlx_engine_server.cli.config import SettingsError, load_settings
from mlx_engine_server.engine import EngineOptions, SamplingParams, rewind
from mlx_engine_server.engine.ngram import MAX_MISS_REST_STEPS, DraftSettings, RowDrafter
from mlx_engine_server.engine.sampling import SeededSampler
from mlx_engine_server.engine.speculative import (
    PROBE_EVERY_STEPS,
    PROBE_STEPS,
    SpeculativeBatchGenerator,
    SpeculativeGenerationBatch,
    StepPacer,
)

from ..conftest import LiveServer, run_live_server, start_engine

SPECULATIVE = EngineOptions(speculative="ngram", num_draft_tokens=4, ngram_size=2)
# A random model decoding greedily soon repeats itself: prompt lookup then drafts tokens that
# the model accepts, so these prompts exercise acceptance as well as rejection.
PROMPTS = [f"{word} one two three {word} one two three {word}" for word in ("red", "blue", "ox")]
PROMPTS += ["A long tale begins", "x y z"]


@pytest.fixture(scope="module")
def spec_server(tiny_model_dir: Path) -> Iterator[LiveServer]:
    live = run_live_server(start_engine(tiny_model_dir, SPECULATIVE))
    yield live
    live.stop()
    live.engine.stop()


def complete(base_url: str, prompt: str, **fields: Any) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True, **fields}
    response = httpx.post(f"{base_url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def together(base_url: str, prompts: list[str], **fields: Any) -> list[dict[str, Any]]:
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        return list(pool.map(lambda p: complete(base_url, p, **fields), prompts))


def texts(results: list[dict[str, Any]]) -> list[str]:
    return [result["choices"][0]["text"] for result in results]


def speculation(server: LiveServer) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{server.base_url}/v1/mlx/status").json()["speculative"]
    return body


@pytest.fixture
def unpaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pacer pauses drafting by the wall time of steps, which other jobs on the machine
    decide; tests that count drafts across servers keep every step speculative."""
    monkeypatch.setattr(StepPacer, "allows_drafts", lambda self: True)


def test_greedy_batched_answers_equal_those_without_speculation(
    spec_server: LiveServer, tiny_server: LiveServer
) -> None:
    before = speculation(spec_server)
    with_drafts = texts(together(spec_server.base_url, PROMPTS))
    without = texts(together(tiny_server.base_url, PROMPTS))
    assert with_drafts == without
    after = speculation(spec_server)
    assert after["mode"] == "ngram"
    assert after["draft_tokens_total"] > before["draft_tokens_total"]
    assert after["accepted_tokens_total"] > before["accepted_tokens_total"]
    assert 0 < after["acceptance_rate"] <= 1


def test_every_token_counts_once_with_its_logprob(spec_server: LiveServer) -> None:
    for result in together(spec_server.base_url, PROMPTS[:3], logprobs=2, max_tokens=17):
        choice = result["choices"][0]
        assert result["usage"]["completion_tokens"] == 17
        assert choice["finish_reason"] == "length"
        assert len(choice["logprobs"]["tokens"]) == 17
        assert len(choice["logprobs"]["top_logprobs"]) == 17
        assert "".join(choice["logprobs"]["tokens"]).strip() == choice["text"].strip()


def test_seeded_sampling_repeats_itself(spec_server: LiveServer) -> None:
    fields = {"temperature": 0.8, "seed": 7}
    first = texts(together(spec_server.base_url, PROMPTS, **fields))
    again = texts(together(spec_server.base_url, PROMPTS, **fields))
    assert first == again
    other_seed = texts(together(spec_server.base_url, PROMPTS, temperature=0.8, seed=8))
    assert other_seed != first


def test_stop_string_cuts_where_it_first_appears(
    spec_server: LiveServer, tiny_server: LiveServer
) -> None:
    full = complete(tiny_server.base_url, PROMPTS[0])["choices"][0]["text"]
    words = re.findall(r"\S{2,}", full)
    assert words, full
    stop = words[len(words) // 2]
    cut = together(spec_server.base_url, [PROMPTS[0]] * 2, stop=[stop])
    for result in cut:
        assert result["choices"][0]["text"] == full[: full.index(stop)]
        assert result["choices"][0]["finish_reason"] == "stop"


def test_structured_output_rows_share_the_batch(spec_server: LiveServer) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    sdk = OpenAI(base_url=f"{spec_server.base_url}/v1", api_key="unused", max_retries=0)
    with ThreadPoolExecutor(max_workers=3) as pool:
        drafting = pool.submit(complete, spec_server.base_url, PROMPTS[1])
        reply = sdk.chat.completions.create(
            model="x",
            messages=[{"role": "user", "content": "a number"}],
            max_tokens=40,
            temperature=0,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "n", "schema": schema},
            },
        )
        assert drafting.result()["usage"]["completion_tokens"] == 24
    content = reply.choices[0].message.content or ""
    assert content.lstrip().startswith("{"), content


def test_metrics_show_drafted_and_accepted(spec_server: LiveServer) -> None:
    complete(spec_server.base_url, PROMPTS[0])
    text = httpx.get(f"{spec_server.base_url}/metrics").text
    drafted = re.search(r"^mlx_server_draft_tokens_total (\S+)$", text, re.M)
    accepted = re.search(r"^mlx_server_accepted_draft_tokens_total (\S+)$", text, re.M)
    rate = re.search(r"^mlx_server_draft_acceptance_rate (\S+)$", text, re.M)
    assert drafted is not None
    assert accepted is not None
    assert rate is not None
    assert float(drafted.group(1)) >= float(accepted.group(1)) > 0
    assert 0 < float(rate.group(1)) <= 1


def test_a_row_that_finds_no_match_for_long_drafts_soon_after_it_starts_copying() -> None:
    """An edit's answer may open with many words of its own before it copies the passage. A
    miss costs a dict probe, so it must not grow rests as rejected drafts do: with rests of up
    to 64 steps the row slept through most of its copying."""
    drafter = RowDrafter(DraftSettings(num_draft_tokens=4, ngram_size=3))
    passage = list(range(1000, 1040))
    context = [*passage, 1]
    for token in range(2, 80):  # 78 steps of an answer sharing no n-gram with the passage
        if not drafter.resting:
            assert drafter.propose(context, limit=4) == []
        else:
            drafter.skip_step()
        context.append(token)
    copied = 3
    context += passage[:copied]  # the answer starts copying
    for _ in range(MAX_MISS_REST_STEPS + 1):
        if drafter.resting:
            drafter.skip_step()
        elif drafter.propose(context, limit=4):
            break
        context.append(passage[copied])
        copied += 1
    else:
        pytest.fail("the row did not draft while it copied")


def test_a_row_whose_drafts_fail_rests_longer_each_time() -> None:
    drafter = RowDrafter(DraftSettings(num_draft_tokens=4, ngram_size=2))
    assert drafter.propose([1, 2, 3, 1, 2], limit=4) == [3, 1, 2]
    drafter.record(drafted=3, accepted=0)
    assert drafter.resting
    rests = []
    for _ in range(3):
        steps = 0
        while drafter.resting:
            drafter.skip_step()
            steps += 1
        rests.append(steps)
        drafter.record(drafted=1, accepted=0)
    assert rests == sorted(rests)
    assert rests[-1] > rests[0]
    assert drafter.draft_length == 1


def test_lookup_tries_the_longest_ngram_first_then_shorter_ones() -> None:
    drafter = RowDrafter(DraftSettings(num_draft_tokens=4, ngram_size=3, ngram_min_size=1))
    # [1, 2, 3] appeared once (followed by 7); [2, 3] later too (followed by 8): longest wins.
    assert drafter.propose([1, 2, 3, 7, 9, 2, 3, 8, 6, 1, 2, 3], limit=4) == [7, 9, 2, 3]
    # No earlier [5, 2, 3] and no [2, 3] either: the last token alone, its latest occurrence.
    fallback = RowDrafter(DraftSettings(num_draft_tokens=4, ngram_size=3, ngram_min_size=1))
    assert fallback.propose([3, 9, 4, 3, 6, 5, 2, 3], limit=4) == [6, 5, 2, 3]
    strict = RowDrafter(DraftSettings(num_draft_tokens=4, ngram_size=3, ngram_min_size=2))
    assert strict.propose([3, 9, 4, 3, 6, 5, 2, 3], limit=4) == []
    # The index grows with the context: what the output adds is found next time.
    assert fallback.propose([3, 9, 4, 3, 6, 5, 2, 3, 6, 5, 1, 6], limit=2) == [5, 1]


def test_ngram_min_size_above_ngram_size_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match="--ngram-min-size 3 is larger than --ngram-size 2"):
        load_settings({"ngram_size": 2, "ngram_min_size": 3})
    assert load_settings({"ngram_size": 1}).ngram_size == 1  # the default minimum follows
    assert RowDrafter(DraftSettings(num_draft_tokens=2, ngram_size=1)).propose([4, 5, 4], 2) == [
        5,
        4,
    ]


SHORT_PROMPTS = ["A long tale begins", "x y z", "1 2 3 4", "The cat sat", "hello world"]


@pytest.mark.usefixtures("unpaced")
def test_shorter_ngrams_draft_where_the_longest_finds_nothing(
    tiny_model_dir: Path, tiny_server: LiveServer
) -> None:
    """The random model soon repeats single tokens: a 4-gram recurs late, a 1-gram at once."""
    without = [complete(tiny_server.base_url, p, max_tokens=12) for p in SHORT_PROMPTS]
    counts = {}
    for min_size in (4, 1):
        options = replace(SPECULATIVE, ngram_size=4, ngram_min_size=min_size)
        live = run_live_server(start_engine(tiny_model_dir, options))
        try:
            answers = [complete(live.base_url, p, max_tokens=12) for p in SHORT_PROMPTS]
            counts[min_size] = speculation(live)
        finally:
            live.stop()
            live.engine.stop()
        assert texts(answers) == texts(without)
    assert counts[1]["draft_tokens_total"] > counts[4]["draft_tokens_total"]
    assert counts[1]["accepted_tokens_total"] > counts[4]["accepted_tokens_total"]


class _TokenBufferOfAnotherRelease:
    """mlx-lm's TokenBuffer as a later release might write it: the same public methods
    (update_and_fetch, tokens, state), other private attributes."""

    def __init__(self, tokens: list[int] | None = None) -> None:
        self._kept = mx.array(tokens or [], dtype=mx.int32)

    def update_and_fetch(self, tokens: mx.array) -> mx.array:
        self._kept = mx.concatenate([self._kept, tokens.astype(mx.int32)])
        return self._kept

    @property
    def tokens(self) -> mx.array:
        return self._kept

    @property
    def state(self) -> mx.array:
        return self._kept


@pytest.mark.usefixtures("unpaced")
@pytest.mark.parametrize("other_release", [False, True], ids=["mlx-lm", "other-release"])
def test_penalties_see_each_drafted_position_through_the_token_buffers_public_api(
    spec_server: LiveServer,
    tiny_server: LiveServer,
    other_release: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Penalties and logit_bias read each drafted position's context; the rows' token
    contexts are used only through TokenBuffer's public methods, so a release of mlx-lm with
    other internals keeps the answers."""
    if other_release:
        generate_module = importlib.import_module("mlx_lm.generate")
        monkeypatch.setattr(generate_module, "TokenBuffer", _TokenBufferOfAnotherRelease)
    before = speculation(spec_server)
    fields = {"frequency_penalty": 0.4, "presence_penalty": 0.3, "logit_bias": {"11": 5}}
    with_drafts = texts(together(spec_server.base_url, PROMPTS, **fields))
    without = texts(together(tiny_server.base_url, PROMPTS, **fields))
    assert with_drafts == without
    after = speculation(spec_server)
    assert after["accepted_tokens_total"] > before["accepted_tokens_total"]
    assert after["draft_tokens_total"] - after["accepted_tokens_total"] > (
        before["draft_tokens_total"] - before["accepted_tokens_total"]
    )


ECHO = (
    "Copy this sentence exactly: The quick brown fox jumps over the lazy dog while "
    "the small cat sleeps on the warm red mat near the door."
)


@pytest.mark.smollm
def test_real_model_accepts_drafts_when_it_copies(
    smollm_dir: Path, smollm_server: LiveServer
) -> None:
    live = run_live_server(start_engine(smollm_dir, SPECULATIVE))
    try:
        body = {"messages": [{"role": "user", "content": ECHO}], "max_tokens": 24}
        answers = [
            httpx.post(
                f"{server.base_url}/v1/chat/completions",
                json={**body, "temperature": 0},
                timeout=300,
            ).json()["choices"][0]["message"]["content"]
            for server in (live, smollm_server)
        ]
        counts = speculation(live)
    finally:
        live.stop()
        live.engine.stop()
    assert answers[0] == answers[1]
    assert "lazy dog" in answers[0]
    assert counts["acceptance_rate"] > 0.3, counts


def test_rejection_rule_keeps_the_sampling_distribution() -> None:
    """With a one-token draft, the emitted token is distributed as the model's p, whatever
    the draft: kept with probability p(draft), else drawn from p without the draft."""
    probs = [0.5, 0.3, 0.15, 0.05]
    logprobs = mx.log(mx.array([probs, probs]))
    sampler = SeededSampler(SamplingParams(max_tokens=1, temperature=1.0, seed=3))
    trials = 3000
    counts = [0] * len(probs)
    kept = 0
    for _ in range(trials):
        accepted, choices = sampler.verify_drafts(logprobs, [1])
        if accepted.item():
            kept += 1
            counts[1] += 1
        else:
            counts[int(choices[0].item())] += 1
    assert kept / trials == pytest.approx(probs[1], abs=0.03)
    for count, p in zip(counts, probs, strict=True):
        assert count / trials == pytest.approx(p, abs=0.03)


def test_pacer_pauses_drafting_while_it_loses_and_probes_plain_steps() -> None:
    pacer = StepPacer()

    def step(speculative: bool, tokens: int, seconds: float) -> None:
        started = time.perf_counter()
        pacer.step_started(speculative)
        time.sleep(seconds)
        pacer.step_done(speculative, tokens, started)

    for _ in range(4):
        step(False, 1, 0.01)  # plain: ~100 tokens/s
    for _ in range(3):
        assert pacer.allows_drafts()
        step(True, 1, 0.04)  # speculative: ~25 tokens/s, a loss
    step(False, 1, 0.01)
    assert not pacer.allows_drafts()

    winning = StepPacer()
    allowed = 0
    for _ in range(PROBE_EVERY_STEPS + PROBE_STEPS):
        allowed += winning.allows_drafts()
        started = time.perf_counter()
        winning.step_started(True)
        winning.step_done(True, 3, started)
    assert allowed == PROBE_EVERY_STEPS  # then a few plain steps refresh the comparison


class _NeverRests(RowDrafter):
    def record(self, drafted: int, accepted: int) -> None:
        """Scripted drafts: their failures must not make the row rest."""


class _AlwaysDrafts(StepPacer):
    def allows_drafts(self) -> bool:
        return True


class _ScriptedDrafts(SpeculativeGenerationBatch):
    """Drafts from a known greedy answer: right for one row and wrong for the other, taking
    turns, so that each step one row accepts its whole draft and the other rejects all of it."""

    answers: ClassVar[dict[int, list[int]]] = {}  # uid -> the greedy answer without drafts
    prompt_tokens: ClassVar[dict[int, int]] = {}
    steps = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pacer = _AlwaysDrafts()

    def _drafter(self, index: int) -> RowDrafter | None:
        uid = self.uids[index]
        if uid not in self._drafters and self.drafting is not None:
            self._drafters[uid] = _NeverRests(self.drafting)
        return self._drafters.get(uid)

    def _drafts(self, pending: list[int], drafters: list[RowDrafter | None]) -> list[list[int]]:
        self.steps += 1
        drafts = []
        for index, uid in enumerate(self.uids):
            done = len(self.tokens[index]) - self.prompt_tokens[uid]
            right = self.answers[uid][done + 1 : done + 1 + min(4, self._room(index))]
            wrong = [(token + 1) % 1000 for token in right]
            drafts.append(right if (self.steps + index) % 2 else wrong)
        return drafts


MakeCaches = Callable[[Any], list[Any]]  # model -> a new row's cache layers


def _generate(
    generator: Any, prompts: list[list[int]], max_tokens: int, make_caches: MakeCaches | None
) -> dict[int, list[int]]:
    """Each row's tokens; after every step, checks the running batch's cache."""
    caches = [make_caches(generator.model) for _ in prompts] if make_caches else None
    uids = generator.insert(prompts, max_tokens=[max_tokens] * len(prompts), caches=caches)
    answers: dict[int, list[int]] = {uid: [] for uid in uids}
    while any(len(tokens) < max_tokens for tokens in answers.values()):
        for response in generator.next()[1]:
            answers[response.uid].append(response.token)
        _check_no_common_left_padding(generator._generation_batch.prompt_cache)
    return answers


def _check_no_common_left_padding(layers: list[Any]) -> None:
    """The cache is as long as its longest row: no column is padding in every row."""
    for layer in layers:
        if layer.keys is None:
            continue
        _, _, offsets, _, length = layer.state
        assert length == max(offsets.tolist()), (length, offsets.tolist())


def check_uneven_rejections(model_dir: Path, make_caches: MakeCaches | None = None) -> None:
    """Greedy answers with scripted drafts, each step one row accepting its whole draft and the
    other rejecting all of it, equal those without drafts; the cache stays as long as its
    longest row after every step."""
    model, tokenizer = load(str(model_dir))
    prompts = [tokenizer.encode("A long tale begins"), tokenizer.encode("x y z")]
    max_tokens = 40
    plain = BatchGenerator(model, stop_tokens=[])
    expected = _generate(plain, prompts, max_tokens, make_caches)
    plain.close()
    generator = SpeculativeBatchGenerator(
        model,
        drafting=DraftSettings(num_draft_tokens=4, ngram_size=3),
        on_verified=lambda drafted, accepted: None,
        make_batch=_ScriptedDrafts.empty,
        stop_tokens=[],
    )
    batch = generator._generation_batch
    assert isinstance(batch, _ScriptedDrafts)
    for uid, prompt in enumerate(prompts):
        _ScriptedDrafts.answers[uid] = expected[uid]
        _ScriptedDrafts.prompt_tokens[uid] = len(prompt)
    answers = _generate(generator, prompts, max_tokens, make_caches)
    generator.close()
    assert [answers[uid] for uid in sorted(answers)] == [expected[0], expected[1]]
    assert batch.steps >= 8  # speculative steps happened, each with an uneven rejection


@pytest.mark.parametrize("few_rows_share", [0.0, 1.0], ids=["roll-batch", "move-rows"])
def test_uneven_rejections_keep_the_cache_as_long_as_its_longest_row(
    tiny_model_dir: Path, few_rows_share: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows that reject in turns each gain left padding; the padding every row has is cut, so
    the cache does not grow by the whole draft width every step. Both ways of shifting a row
    (mlx-lm's roll of the batch, or moving only the rows that shift) keep the answers."""
    monkeypatch.setattr(rewind, "FEW_ROWS_SHARE", few_rows_share)
    check_uneven_rejections(tiny_model_dir)
