"""Speculative decoding with a draft model, over real HTTP and batched: the answers are the ones
the engine gives without speculation, with the model as its own draft (every greedy draft is
accepted) and with another random model of the same tokenizer (few are)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_engine_server.cli.config import load_settings
from mlx_engine_server.cli.settings_errors import SettingsError
from mlx_engine_server.engine import EngineClient, EngineOptions, SamplingParams
from mlx_engine_server.engine.local import local_client
from mlx_engine_server.engine.sampling import SeededSampler
from mlx_engine_server.models.draft import load_with_draft
from mlx_engine_server.models.loader import ModelSource

from ..cli.test_cli import MLX_SERVER, clean_env
from ..conftest import LiveServer, run_live_server
from ..model_factory import build_tiny_llama
from . import test_speculative
from .test_speculative import PROMPTS, complete, speculation, texts, together


def start_drafting_engine(model_dir: Path, draft_dir: Path) -> EngineClient:
    source = ModelSource(model_path=str(model_dir))
    options = EngineOptions(
        speculative="draft", num_draft_tokens=4, draft_model_path=str(draft_dir)
    )
    engine = local_client(lambda: load_with_draft(source, str(draft_dir)), options)
    engine.start()
    return engine


@pytest.fixture(scope="module")
def other_draft_dir(tmp_path_factory: pytest.TempPathFactory, smollm_dir: Path) -> Path:
    """Another random llama with SmolLM2's tokenizer: its drafts rarely agree."""
    dest = tmp_path_factory.mktemp("draft-llama") / "draft-llama"
    return build_tiny_llama(dest, smollm_dir, seed=1)


@pytest.fixture(scope="module", params=["self", "other"])
def draft_server(
    request: pytest.FixtureRequest, tiny_model_dir: Path, other_draft_dir: Path
) -> Iterator[LiveServer]:
    draft = tiny_model_dir if request.param == "self" else other_draft_dir
    live = run_live_server(start_drafting_engine(tiny_model_dir, draft))
    yield live
    live.stop()
    live.engine.stop()


def test_greedy_batched_answers_equal_those_without_speculation(
    draft_server: LiveServer, tiny_server: LiveServer, tiny_model_dir: Path
) -> None:
    before = speculation(draft_server)
    with_drafts = texts(together(draft_server.base_url, PROMPTS))
    without = texts(together(tiny_server.base_url, PROMPTS))
    assert with_drafts == without
    after = speculation(draft_server)
    assert after["mode"] == "draft"
    drafted = after["draft_tokens_total"] - before["draft_tokens_total"]
    accepted = after["accepted_tokens_total"] - before["accepted_tokens_total"]
    assert drafted > 0
    if after["draft_model"] == str(tiny_model_dir):  # its own draft: it always agrees
        assert accepted == drafted
    else:
        assert accepted < drafted


def test_every_token_counts_once_with_its_logprob(draft_server: LiveServer) -> None:
    for result in together(draft_server.base_url, PROMPTS[:3], logprobs=2, max_tokens=17):
        choice = result["choices"][0]
        assert result["usage"]["completion_tokens"] == 17
        assert choice["finish_reason"] == "length"
        assert len(choice["logprobs"]["tokens"]) == 17
        assert len(choice["logprobs"]["top_logprobs"]) == 17
        assert "".join(choice["logprobs"]["tokens"]).strip() == choice["text"].strip()


def test_seeded_sampling_repeats_itself(draft_server: LiveServer) -> None:
    before = speculation(draft_server)
    fields = {"temperature": 0.8, "seed": 7}
    first = texts(together(draft_server.base_url, PROMPTS, **fields))
    again = texts(together(draft_server.base_url, PROMPTS, **fields))
    assert first == again
    other_seed = texts(together(draft_server.base_url, PROMPTS, temperature=0.8, seed=8))
    assert other_seed != first
    assert speculation(draft_server)["draft_tokens_total"] > before["draft_tokens_total"]


def test_stop_string_cuts_where_it_first_appears(
    draft_server: LiveServer, tiny_server: LiveServer
) -> None:
    full = complete(tiny_server.base_url, PROMPTS[3])["choices"][0]["text"]
    middle = len(full) // 2
    stop = full[middle : middle + 2]
    assert full.index(stop) > 0, full
    cut = together(draft_server.base_url, [PROMPTS[3]] * 2, stop=[stop])
    for result in cut:
        assert result["choices"][0]["text"] == full[: full.index(stop)]
        assert result["choices"][0]["finish_reason"] == "stop"


def test_structured_output_rows_share_the_batch(draft_server: LiveServer) -> None:
    test_speculative.test_structured_output_rows_share_the_batch(draft_server)


def test_a_draft_model_with_another_tokenizer_is_refused_at_start_up(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    draft = build_tiny_llama(tmp_path / "swapped", tiny_model_dir, seed=2)
    tokenizer_file = draft / "tokenizer.json"
    spec = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    first, second = "the", "ĠThe"
    vocab[first], vocab[second] = vocab[second], vocab[first]
    tokenizer_file.write_text(json.dumps(spec), encoding="utf-8")
    args = [str(tiny_model_dir), "--port", "0", "--speculative", "draft", "--draft-model"]
    result = subprocess.run(
        [MLX_SERVER, *args, str(draft)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "does not share the model's tokenizer" in result.stderr
    assert result.stdout == ""


def test_draft_mode_without_a_draft_model_is_a_settings_error(tiny_model_dir: Path) -> None:
    result = subprocess.run(
        [MLX_SERVER, str(tiny_model_dir), "--speculative", "draft"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--speculative draft needs --draft-model" in result.stderr


def test_draft_model_rejection_rule_keeps_the_sampling_distribution() -> None:
    """A one-token draft drawn from q, kept with min(1, p/q), else replaced from max(0, p - q):
    the emitted token is distributed as p, however far q is from it."""
    p = [0.5, 0.3, 0.15, 0.05]
    q = [0.1, 0.1, 0.7, 0.1]
    logprobs = mx.log(mx.array([p, p]))
    draft_logprobs = mx.log(mx.array([q]))
    sampler = SeededSampler(SamplingParams(max_tokens=1, temperature=1.0, seed=5))
    trials = 3000
    counts = [0] * len(p)
    kept = 0
    for _ in range(trials):
        draft = int(sampler(draft_logprobs)[0].item())
        accepted, choices = sampler.verify_sampled_drafts(logprobs, draft_logprobs, [draft])
        token = draft if accepted.item() else int(choices[0].item())
        kept += bool(accepted.item())
        counts[token] += 1
    assert kept / trials == pytest.approx(sum(map(min, p, q)), abs=0.03)
    for count, share in zip(counts, p, strict=True):
        assert count / trials == pytest.approx(share, abs=0.03)


def test_naming_a_draft_model_turns_draft_mode_on_and_ngram_refuses_it() -> None:
    assert load_settings({"draft_model": "/models/small"}).speculative == "draft"
    with pytest.raises(SettingsError, match="--speculative draft only"):
        load_settings({"draft_model": "/models/small", "speculative": "ngram"})
