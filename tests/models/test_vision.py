"""Images over real HTTP with a tiny random-weight SmolVLM (mlx-vlm's smolvlm family).

The answers are checked against mlx-vlm's own generation for the same prompt and image, so the
engine's path (processor and vision tower on the worker, then decoding in the shared batch) is
proven equal to the library's, not only "some text came back".
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from PIL import Image
from starlette.testclient import TestClient

from mlx_engine_server.chat.media import MediaPolicy
from mlx_engine_server.engine import EngineClient
from mlx_engine_server.http.app import ServerOptions, create_app

from ..chat.test_media import image_bytes, png_header_only
from ..cli.test_shutdown import free_port, start_server
from ..conftest import LiveServer, run_live_server, start_engine
from ..vision_factory import IMAGE_SEQ_LEN, build_tiny_smolvlm

MAX_TOKENS = 6


def data_uri(color: str = "red", size: tuple[int, int] = (50, 40), fmt: str = "PNG") -> str:
    return (
        f"data:image/{fmt.lower()};base64,"
        + base64.b64encode(image_bytes(fmt, size, color)).decode()
    )


def user_turn(*urls: str, text: str = "What is in the picture?") -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return {"role": "user", "content": parts}


def chat(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, **extra}


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory: pytest.TempPathFactory, smollm_dir: Path) -> Path:
    return build_tiny_smolvlm(tmp_path_factory.mktemp("smolvlm") / "smolvlm", smollm_dir)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("media")
    (root / "allowed").mkdir()
    (root / "allowed" / "photo.png").write_bytes(image_bytes(color="red", size=(50, 40)))
    (root / "secret.png").write_bytes(image_bytes(color="blue"))
    (root / "allowed" / "escape.png").symlink_to(root / "secret.png")
    return root


@pytest.fixture(scope="module")
def vision_engine(vision_dir: Path) -> Iterator[EngineClient]:
    engine = start_engine(vision_dir)
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def vision_server(vision_engine: EngineClient, media_dir: Path) -> Iterator[LiveServer]:
    """Files under media_dir/allowed and remote URLs allowed: the refusals left are the rules."""
    policy = MediaPolicy(allowed_dirs=(media_dir / "allowed",), allow_remote=True, max_images=3)
    live = run_live_server(vision_engine, ServerOptions(media=policy))
    yield live
    live.stop()


@pytest.fixture(scope="module")
def http(vision_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=vision_server.base_url, timeout=60) as client:
        yield client


def strict_client(engine: EngineClient, policy: MediaPolicy) -> TestClient:
    """Another app on the same engine with its own policy (no lifespan: the engine stays up)."""
    return TestClient(create_app(engine, ServerOptions(media=policy)))


class Recorder(BaseHTTPRequestHandler):
    """Serves a PNG and records every request that reaches it."""

    requests: list[str] = []  # noqa: RUF012 - shared on purpose: the test reads it

    def do_GET(self) -> None:
        Recorder.requests.append(self.path)
        body = image_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture(scope="module")
def recorder_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


@pytest.fixture
def recorder(recorder_port: int) -> tuple[int, list[str]]:
    """A local HTTP server's port, and the requests that reached it during the test."""
    Recorder.requests.clear()
    return recorder_port, Recorder.requests


def reference_tokens(vision_dir: Path, engine: EngineClient, body: dict[str, Any]) -> list[int]:
    """mlx-vlm's own greedy generation for the prompt the server builds (its processor output)."""
    import mlx.core as mx
    from mlx_vlm.generate.ar import generate_step
    from mlx_vlm.utils import load

    model, processor = load(str(vision_dir))
    model.set_dtype(mx.float32)
    messages = [
        {"role": m["role"], "content": [_template_part(p) for p in m["content"]]}
        for m in body["messages"]
    ]
    text = engine.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    images = [
        Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",", 1)[1]))).convert(
            "RGB"
        )
        for m in body["messages"]
        for p in m["content"]
        if p["type"] == "image_url"
    ]
    inputs = processor(images=[images], text=[text], add_special_tokens=False)
    steps = generate_step(
        inputs["input_ids"],
        model,
        inputs["pixel_values"],
        None,
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        pixel_attention_mask=inputs["pixel_attention_mask"],
    )
    return [int(token) for (token, _), _ in zip(steps, range(MAX_TOKENS), strict=False)]


def _template_part(part: dict[str, Any]) -> dict[str, Any]:
    return part if part["type"] == "text" else {"type": "image"}


def answer_tokens(engine: EngineClient, reply: dict[str, Any]) -> list[int]:
    tokens: list[int] = engine.tokenizer.encode(
        reply["choices"][0]["message"]["content"], add_special_tokens=False
    )
    return tokens


# --- the model and the answers --------------------------------------------------------------


def test_a_vision_model_is_served_as_vision(http: httpx.Client) -> None:
    (card,) = http.get("/v1/models").json()["data"]
    assert card["kind"] == "vision"
    assert http.get("/v1/mlx/status").json()["model"]["kind"] == "vision"


def test_one_image_answers_as_mlx_vlm_does(
    http: httpx.Client, vision_engine: EngineClient, vision_dir: Path
) -> None:
    body = chat([user_turn(data_uri("red"))], logprobs=True)
    reply = http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    got = [entry["token"] for entry in reply.json()["choices"][0]["logprobs"]["content"]]
    expected = reference_tokens(vision_dir, vision_engine, body)
    tokenizer = vision_engine.tokenizer
    assert got == [tokenizer.decode([token]) for token in expected]


def test_the_image_changes_the_answer_and_usage_counts_image_tokens(
    http: httpx.Client, vision_engine: EngineClient
) -> None:
    text_only = http.post("/v1/chat/completions", json=chat([user_turn()])).json()
    red = http.post("/v1/chat/completions", json=chat([user_turn(data_uri("red"))])).json()
    noise = Image.effect_noise((50, 40), 80).convert("RGB")
    buffer = io.BytesIO()
    noise.save(buffer, "PNG")
    noisy_uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    noisy = http.post("/v1/chat/completions", json=chat([user_turn(noisy_uri)])).json()
    assert red["choices"][0]["message"] != noisy["choices"][0]["message"]
    # A 50x40 image is resized to 64 px and split in 2x2 tiles plus a global view.
    image_tokens = red["usage"]["prompt_tokens"] - text_only["usage"]["prompt_tokens"]
    assert image_tokens >= 5 * IMAGE_SEQ_LEN
    assert red["usage"]["prompt_tokens"] == noisy["usage"]["prompt_tokens"]


def anthropic_image(color: str) -> dict[str, Any]:
    png = base64.b64encode(image_bytes("PNG", (50, 40), color)).decode()
    return {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}}


def test_anthropic_image_blocks_reach_the_vision_model(http: httpx.Client) -> None:
    """/v1/messages takes Anthropic's image blocks down the same image path as chat."""

    def ask(*blocks: dict[str, Any]) -> httpx.Response:
        content = [{"type": "text", "text": "What is in the picture?"}, *blocks]
        body = {"model": "m", "max_tokens": MAX_TOKENS, "temperature": 0}
        return http.post(
            "/v1/messages", json={**body, "messages": [{"role": "user", "content": content}]}
        )

    def prompt_tokens(reply: dict[str, Any]) -> int:  # Anthropic counts cache reads apart
        return int(reply["usage"]["input_tokens"] + reply["usage"]["cache_read_input_tokens"])

    text_only, red = ask().json(), ask(anthropic_image("red")).json()
    assert red["type"] == "message"
    assert prompt_tokens(red) - prompt_tokens(text_only) >= 5 * IMAGE_SEQ_LEN
    bad_source = ask({"type": "image", "source": {"type": "file", "file_id": "f_1"}})
    assert bad_source.status_code == 400
    assert bad_source.json()["type"] == "error"
    assert "messages[0].content[1].source" in bad_source.json()["error"]["message"]


def test_responses_input_image_reaches_the_vision_model(http: httpx.Client) -> None:
    def ask(*parts: dict[str, Any]) -> dict[str, Any]:
        content = [{"type": "input_text", "text": "What is in the picture?"}, *parts]
        body = {"model": "m", "max_output_tokens": MAX_TOKENS, "temperature": 0}
        reply = http.post(
            "/v1/responses", json={**body, "input": [{"role": "user", "content": content}]}
        )
        assert reply.status_code == 200, reply.text
        answer: dict[str, Any] = reply.json()
        return answer

    text_only, red = ask(), ask({"type": "input_image", "image_url": data_uri("red")})
    assert red["status"] in ("completed", "incomplete")
    assert red["usage"]["input_tokens"] - text_only["usage"]["input_tokens"] >= 5 * IMAGE_SEQ_LEN


def test_two_images_in_one_message_and_across_turns(http: httpx.Client) -> None:
    one = http.post("/v1/chat/completions", json=chat([user_turn(data_uri("red"))])).json()
    two = http.post(
        "/v1/chat/completions", json=chat([user_turn(data_uri("red"), data_uri("blue"))])
    )
    assert two.status_code == 200, two.text
    turns = [
        user_turn(data_uri("red")),
        {"role": "assistant", "content": "A red square."},
        user_turn(data_uri("green", fmt="JPEG"), text="And this one?"),
    ]
    across = http.post("/v1/chat/completions", json=chat(turns))
    assert across.status_code == 200, across.text
    base = one["usage"]["prompt_tokens"]
    assert two.json()["usage"]["prompt_tokens"] > base + 5 * IMAGE_SEQ_LEN
    assert across.json()["usage"]["prompt_tokens"] > base + 5 * IMAGE_SEQ_LEN


def test_text_only_requests_to_a_vision_model(http: httpx.Client) -> None:
    reply = http.post(
        "/v1/chat/completions",
        json=chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]),
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == MAX_TOKENS


def test_streaming_with_an_image(http: httpx.Client) -> None:
    body = chat([user_turn(data_uri("red"))], stream=True)
    with http.stream("POST", "/v1/chat/completions", json=body) as reply:
        assert reply.status_code == 200
        lines = [line for line in reply.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"


def test_the_prefix_cache_never_mixes_up_images(http: httpx.Client) -> None:
    """Same tokens (image placeholders look alike), other image: no cache hit, other answer."""
    question = "Describe this picture in a few words, please."
    first = http.post(
        "/v1/chat/completions", json=chat([user_turn(data_uri("red"), text=question)])
    )
    again = http.post(
        "/v1/chat/completions", json=chat([user_turn(data_uri("red"), text=question)])
    )
    other = http.post(
        "/v1/chat/completions", json=chat([user_turn(data_uri("blue"), text=question)])
    )
    assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert other.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert again.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]


def test_an_allowed_file_is_read(http: httpx.Client, media_dir: Path) -> None:
    from_uri = http.post("/v1/chat/completions", json=chat([user_turn(data_uri("red"))])).json()
    for url in (f"file://{media_dir}/allowed/photo.png", f"{media_dir}/allowed/photo.png"):
        reply = http.post("/v1/chat/completions", json=chat([user_turn(url)]))
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"] == from_uri["choices"][0]["message"]


# --- refusals over HTTP -------------------------------------------------------------------


def assert_refused(reply: httpx.Response, param: str, code: str | None = None) -> dict[str, Any]:
    assert reply.status_code == 400, reply.text
    error: dict[str, Any] = reply.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize(
    "path",
    [
        "{root}/secret.png",
        "file://{root}/secret.png",
        "file://{root}/allowed/../secret.png",
        "file://{root}/allowed/%2e%2e/secret.png",
        "{root}/allowed/escape.png",
    ],
)
def test_files_outside_the_allowed_dir_are_refused(
    http: httpx.Client, media_dir: Path, path: str
) -> None:
    messages = [{"role": "system", "content": "x"}, user_turn(path.format(root=media_dir))]
    assert_refused(
        http.post("/v1/chat/completions", json=chat(messages)), "messages[1].content[1].image_url"
    )


@pytest.mark.parametrize(
    "host", ["127.0.0.1", "localhost", "[::1]", "[::ffff:127.0.0.1]", "0x7f.0.0.1", "2130706433"]
)
def test_loopback_urls_are_never_fetched(
    http: httpx.Client, recorder: tuple[int, list[str]], host: str
) -> None:
    port, requests = recorder
    url = f"http://{host}:{port}/image.png"
    reply = http.post("/v1/chat/completions", json=chat([user_turn(url)]))
    assert_refused(reply, "messages[0].content[1].image_url")
    assert requests == []  # nothing reached the local server
    # The recorder does answer when asked directly: the refusal is the policy's, not a dead port.
    assert httpx.get(f"http://127.0.0.1:{port}/direct").status_code == 200
    assert requests == ["/direct"]


def test_remote_urls_are_off_by_default(
    vision_engine: EngineClient, recorder: tuple[int, list[str]]
) -> None:
    port, requests = recorder
    client = strict_client(vision_engine, MediaPolicy())
    url = f"http://127.0.0.1:{port}/image.png"
    error = assert_refused(
        client.post("/v1/chat/completions", json=chat([user_turn(url)])),
        "messages[0].content[1].image_url",
    )
    assert "--allow-remote-media" in error["message"]
    assert requests == []


def test_oversized_and_bomb_images(vision_engine: EngineClient) -> None:
    client = strict_client(vision_engine, MediaPolicy(max_image_bytes=2000))
    big = Image.effect_noise((100, 100), 100).convert("RGB")
    buffer = io.BytesIO()
    big.save(buffer, "PNG")
    assert len(buffer.getvalue()) > 2000
    big_uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    param = "messages[0].content[1].image_url"
    reply = client.post("/v1/chat/completions", json=chat([user_turn(big_uri)]))
    assert_refused(reply, param, "image_too_large")
    bomb = "data:image/png;base64," + base64.b64encode(png_header_only(50_000, 50_000)).decode()
    reply = client.post("/v1/chat/completions", json=chat([user_turn(bomb)]))
    assert_refused(reply, param, "image_too_large")


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("data:image/png;base64,%%%not base64%%%", "invalid_base64"),
        (
            "data:image/svg+xml;base64,"
            + base64.b64encode(b'<svg xmlns="http://www.w3.org/2000/svg"/>').decode(),
            "invalid_image_format",
        ),
        ("ftp://example.com/a.png", "invalid_image_url"),
    ],
)
def test_bad_image_data(http: httpx.Client, url: str, code: str) -> None:
    reply = http.post("/v1/chat/completions", json=chat([user_turn(url)]))
    assert_refused(reply, "messages[0].content[1].image_url", code)


def test_too_many_images(http: httpx.Client) -> None:
    reply = http.post("/v1/chat/completions", json=chat([user_turn(*[data_uri()] * 4)]))
    assert_refused(reply, "messages[0].content[4].image_url", "too_many_images")


def test_images_only_in_user_messages(http: httpx.Client) -> None:
    messages = [
        user_turn(),
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": data_uri()}}]},
        user_turn(),
    ]
    assert_refused(http.post("/v1/chat/completions", json=chat(messages)), "messages[1].content[0]")


def test_unknown_part_types_and_fields(http: httpx.Client) -> None:
    audio = {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}
    assert_refused(http.post("/v1/chat/completions", json=chat([audio])), "messages[0].content[0]")
    detail = user_turn()
    detail["content"].append({"type": "image_url", "image_url": {"url": data_uri(), "detail": "x"}})
    assert_refused(
        http.post("/v1/chat/completions", json=chat([detail])),
        "messages[0].content[1].image_url.detail",
    )


def test_a_text_model_refuses_images_without_fetching(
    client: TestClient, recorder: tuple[int, list[str]]
) -> None:
    port, requests = recorder
    for url in (data_uri(), f"http://127.0.0.1:{port}/x.png"):
        reply = client.post("/v1/chat/completions", json=chat([user_turn(url)]))
        assert reply.status_code == 400
        error = reply.json()["error"]
        assert (error["param"], error["code"]) == (
            "messages[0].content[1].image_url",
            "model_not_multimodal",
        )
    assert requests == []


# --- concurrency --------------------------------------------------------------------------


def test_text_requests_run_while_an_image_request_generates(http: httpx.Client) -> None:
    """A long image request in the batch does not hold up a short text request."""
    long_body = chat([user_turn(data_uri("red"))], max_tokens=400, ignore_eos=True, stream=True)
    with http.stream("POST", "/v1/chat/completions", json=long_body) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        started = time.monotonic()
        short = http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3},
        )
        short_s = time.monotonic() - started
        assert short.status_code == 200
        rest = [line for line in lines if line.startswith("data: ")]
    long_s = time.monotonic() - started
    assert rest[-1] == "data: [DONE]"
    assert short_s < long_s / 2, (short_s, long_s)


class Redirector(Recorder):
    def do_GET(self) -> None:
        if self.path.startswith("/redirect"):
            Recorder.requests.append(self.path)
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1/elsewhere.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        super().do_GET()


def test_the_fetch_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """The address check is the only thing loosened (to let the fetch reach a local server):
    the GET, the refused redirect and the byte cap are the real code."""
    from mlx_engine_server.chat import media

    monkeypatch.setattr(media, "is_public_address", lambda address: address == "127.0.0.1")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirector)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    Recorder.requests.clear()
    try:
        base = f"http://localhost:{server.server_address[1]}"
        policy = MediaPolicy(allow_remote=True)
        loaded = media.load_image(f"{base}/ok.png?x=1", "p", policy)
        assert loaded.image.size == (20, 10)
        with pytest.raises(media.InvalidRequestError, match="HTTP 302"):
            media.load_image(f"{base}/redirect.png", "p", policy)
        with pytest.raises(media.InvalidRequestError, match="larger than"):
            media.load_image(
                f"{base}/ok.png", "p", MediaPolicy(allow_remote=True, max_image_bytes=10)
            )
        assert Recorder.requests == ["/ok.png?x=1", "/redirect.png", "/ok.png"]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_images_cross_to_an_engine_process(vision_dir: Path, http: httpx.Client) -> None:
    """`mlx-server` as users run it: its front loads the processor itself (no weights) and
    sends the processed image to the engine process; the answer equals the in-thread one."""
    body = chat([user_turn(data_uri("green"))])
    expected = http.post("/v1/chat/completions", json=body)
    assert expected.status_code == 200, expected.text
    port = free_port()
    process = start_server(vision_dir, port)
    try:
        base = f"http://127.0.0.1:{port}"
        got = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
        status = httpx.get(f"{base}/v1/mlx/status", timeout=10).json()
    finally:
        process.terminate()
        process.communicate(timeout=30)
    assert got.status_code == 200, got.text
    assert status["model"]["kind"] == "vision"
    assert status["engine"]["process_id"] != process.pid
    assert got.json()["usage"]["prompt_tokens"] == expected.json()["usage"]["prompt_tokens"]
    answer = got.json()["choices"][0]["message"]["content"]
    assert answer == expected.json()["choices"][0]["message"]["content"]
