"""One model over two processes: the real `mlx.launch`, ring backend on 127.0.0.1, CPU.

The tiny llama's head counts (4 query, 2 key/value) divide by 2, so it loads tensor-parallel.
Rank 0 serves HTTP; the API tests of the single-process server run again against it (imported
below: pytest collects them here, where `client` is an HTTP client of the group), its greedy
and seeded answers equal the single-process ones, and a rank that dies or hangs ends the group.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import mlx.core as mx
import pytest

from ..chat.test_structured import (  # noqa: F401
    test_constrained_row_ends_with_its_grammar_even_with_ignore_eos,
    test_json_schema_output_validates_even_from_random_weights,
)
from ..conftest import LiveServer
from ..engine.test_prefix_cache import conversation
from ..protocols.test_api import (  # noqa: F401 - collected again here, against the group
    test_chat_completion_parses_as_openai_type,
    test_completion_accepts_token_ids_and_a_one_string_list,
    test_context_length_exceeded,
    test_greedy_is_deterministic_and_model_accepted_whatever_it_says,
    test_logit_bias_forces_a_token,
    test_models_list_and_card,
    test_penalties_and_filters_are_accepted,
    test_seed_reproduces_sampling,
    test_stop_string_cuts_the_text_and_is_not_returned,
    test_stream_include_usage_sends_a_last_usage_chunk,
    test_streamed_chat_equals_non_streamed,
    test_text_completion_and_its_stream,
)
from ..protocols.test_choices_logprobs import (  # noqa: F401
    test_chat_logprobs_shape_and_greedy_consistency,
    test_chat_logprobs_stream_in_chunks_equal_to_the_whole,
    test_completion_prompts_as_lists_each_with_n_choices,
    test_n_choices_are_indexed_seeded_and_counted,
    test_n_choices_stream_with_their_indexes,
)

LAUNCH = Path(sys.executable).parent / "mlx.launch"
SERVER = Path(sys.executable).parent / "mlx-server"
START_TIMEOUT_S = 90
GROUP_END_TIMEOUT_S = 40

pytestmark = pytest.mark.skipif(
    not LAUNCH.is_file() or not mx.distributed.is_available("ring"),
    reason="mlx.launch or MLX's ring backend is not available in this environment",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Group:
    """`mlx.launch` running two ranks of mlx-server; rank 0 answers HTTP on `base_url`."""

    launcher: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def rank_pid(self, rank: int) -> int:
        """The rank's process: a child of the launcher (its shell execs the command)."""
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and _parent_pid(entry) == self.launcher.pid:
                environ = (entry / "environ").read_bytes().split(b"\0")
                if f"MLX_RANK={rank}".encode() in environ:
                    return int(entry.name)
        raise LookupError(f"no rank {rank} under launcher {self.launcher.pid}")

    def end(self) -> None:
        if self.launcher.poll() is None:
            os.killpg(self.launcher.pid, signal.SIGKILL)  # the session this test started
        self.launcher.wait(timeout=30)


def _parent_pid(proc_entry: Path) -> int | None:
    try:
        stat = (proc_entry / "stat").read_text(encoding="utf-8")
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def launch_group(model_dir: Path, log_path: Path, *flags: str) -> Group:
    port, ring_port = free_port(), free_port()
    command = [
        str(LAUNCH),
        "--backend",
        "ring",
        "--hosts",
        "127.0.0.1,127.0.0.1",
        "--starting-port",
        str(ring_port),
        "--",
        str(SERVER),
        str(model_dir),
        "--port",
        str(port),
        "--log-level",
        "warning",
        *flags,
    ]
    with log_path.open("wb") as log:
        launcher = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    group = Group(launcher, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and launcher.poll() is None:
        try:
            if httpx.get(f"{group.base_url}/health", timeout=2).status_code == 200:
                return group
        except httpx.TransportError:
            time.sleep(0.3)
    group.end()
    raise RuntimeError(f"the group did not become healthy:\n{group.log()}")


@pytest.fixture(scope="module")
def group(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Group]:
    log_path = tmp_path_factory.mktemp("group") / "launch.log"
    started = launch_group(tiny_model_dir, log_path)
    yield started
    # Ending rank 0 ends the group: it tells the other rank to stop, and both exit 0.
    os.kill(started.rank_pid(0), signal.SIGTERM)
    try:
        assert started.launcher.wait(timeout=GROUP_END_TIMEOUT_S) is not None
        assert "exited with code" not in started.log(), started.log()
    finally:
        started.end()


@pytest.fixture(scope="module")
def client(group: Group) -> Iterator[httpx.Client]:
    """The API tests imported above run against rank 0 of the group through this client."""
    with httpx.Client(base_url=group.base_url, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def single(tiny_server: LiveServer) -> Iterator[httpx.Client]:
    """The same model in one process: the reference answers."""
    with httpx.Client(base_url=tiny_server.base_url, timeout=60) as http:
        yield http


def streamed_text(http: httpx.Client, body: dict[str, Any]) -> str:
    text = []
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[len("data: ") :])
                text += [choice["text"] for choice in chunk["choices"]]
    return "".join(text)


LONG_STREAM = {"prompt": "Count:", "max_tokens": 200, "ignore_eos": True, "stream": True}
PROMPTS = ["Hello there", "The capital of France is", "Once upon a time", "1, 2, 3,"]


def test_status_shows_the_group(client: httpx.Client) -> None:
    status = client.get("/v1/mlx/status").json()
    assert status["distributed"] == {"backend": "ring", "size": 2, "rank": 0, "mode": "tensor"}


def test_concurrent_streams_equal_the_single_process_answers(
    client: httpx.Client, single: httpx.Client
) -> None:
    bodies = [{"prompt": prompt, "max_tokens": 10, "temperature": 0} for prompt in PROMPTS]
    bodies.append({"prompt": PROMPTS[0], "max_tokens": 10, "temperature": 0.9, "seed": 11})
    answers: dict[int, str] = {}

    def ask(index: int) -> None:
        answers[index] = streamed_text(client, bodies[index])

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    expected = [streamed_text(single, body) for body in bodies]
    assert [answers.get(index) for index in range(len(bodies))] == expected
    assert len(set(expected)) == len(expected)  # different prompts, different answers


def test_conversation_reuses_the_prefix_cache_and_answers_the_same(
    client: httpx.Client, single: httpx.Client
) -> None:
    turns = conversation(client)  # type: ignore[arg-type]
    assert turns[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    reference = conversation(single)  # type: ignore[arg-type]
    replies = [turn["choices"][0]["message"]["content"] for turn in turns]
    assert replies == [turn["choices"][0]["message"]["content"] for turn in reference]


def test_a_client_leaving_mid_stream_frees_its_row_on_every_rank(
    client: httpx.Client, single: httpx.Client
) -> None:
    with client.stream("POST", "/v1/completions", json=LONG_STREAM) as response:
        next(line for line in response.iter_lines() if line.startswith("data: {"))
    deadline = time.monotonic() + 10
    while client.get("/v1/mlx/status").json()["engine"]["requests_active"]:
        assert time.monotonic() < deadline, "the abandoned request is still generating"
        time.sleep(0.1)
    # Had a rank kept the row, the batches would differ between ranks and so would the answer.
    body = {"prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0}
    assert streamed_text(client, body) == streamed_text(single, body)


def stream_until_error(
    url: str, started: threading.Event, outcome: list[str], body: dict[str, Any]
) -> None:
    """Read a long stream; record how it ended: an error event, [DONE] or a cut connection."""
    try:
        with httpx.stream("POST", url, json=body, timeout=60) as response:
            for line in response.iter_lines():
                started.set()
                if line.startswith("data: ") and '"error"' in line:
                    outcome.append("error")
                    return
                if line == "data: [DONE]":
                    outcome.append("done")
                    return
        outcome.append("ended")
    except httpx.TransportError:
        outcome.append("cut")
    finally:
        started.set()


def wait_for_rank_zero_to_go(group: Group) -> None:
    deadline = time.monotonic() + GROUP_END_TIMEOUT_S
    while True:
        try:
            if httpx.get(f"{group.base_url}/health", timeout=1).status_code == 503:
                time.sleep(0.2)
                continue
        except httpx.TransportError:
            return
        assert time.monotonic() < deadline, f"rank 0 still serves:\n{group.log()}"
        time.sleep(0.2)


# 6 s: a step of the tiny model takes milliseconds, but a busy machine once stalled one for 3.3 s.
@pytest.mark.parametrize(("fault", "timeout_s"), [("killed", 30), ("stopped", 6)])
def test_a_rank_that_dies_or_hangs_ends_the_group(
    tiny_model_dir: Path, tmp_path: Path, fault: str, timeout_s: int
) -> None:
    """Killed: the next collective fails ("connection to a peer was lost"), usually at once.
    Stopped (SIGSTOP): rank 0 blocks in a collective until the watchdog's timeout. Either way the
    request in flight ends with an error, /health stops answering 200, and rank 0 exits with 3."""
    group = launch_group(
        tiny_model_dir,
        tmp_path / "launch.log",
        "--max-batch-size=1",
        "--max-queue=0",
        f"--distributed-timeout-s={timeout_s}",
    )
    follower = group.rank_pid(1)
    try:
        started, outcome = threading.Event(), []
        url = f"{group.base_url}/v1/completions"
        reader = threading.Thread(
            target=stream_until_error, args=(url, started, outcome, LONG_STREAM)
        )
        reader.start()
        assert started.wait(timeout=30)
        busy = httpx.post(url, json={"prompt": "x", "max_tokens": 2}, timeout=30)
        assert busy.status_code == 429  # backpressure still answers at once
        os.kill(follower, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        reader.join(timeout=GROUP_END_TIMEOUT_S)
        assert outcome in (["error"], ["cut"]), outcome
        wait_for_rank_zero_to_go(group)
        if fault == "stopped":
            os.kill(follower, signal.SIGKILL)  # a stopped process cannot be ended otherwise
        assert group.launcher.wait(timeout=GROUP_END_TIMEOUT_S) is not None
        log = group.log()
        if fault == "killed" and "the distributed group failed" not in log:
            # mlx.launch saw rank 1 die and sent rank 0 SIGTERM before rank 0's next collective
            # failed: rank 0 then drained and stopped as on any SIGTERM (the stream was cut above).
            assert re.search(r"Node with rank 1 (was killed|exited with code -9)", log), log
            return
        assert "the distributed group failed" in log, log
        assert "Node with rank 0 exited with code 3" in log, log
    finally:
        if fault == "stopped":
            with contextlib.suppress(ProcessLookupError):
                os.kill(follower, signal.SIGKILL)
        group.end()
