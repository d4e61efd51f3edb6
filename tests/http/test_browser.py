"""The status page and /docs in a real headless browser: Debian's Chromium, driven by Playwright.

Against real uvicorn servers on the tiny model: the page loads and shows the model, its figures
follow a request the test makes, a chat message streams an answer into the page, /docs lists every
path of /openapi.json; with API keys and behind a proxy that mounts the server under --root-path,
the page asks for the key and then works, every request it makes staying under the prefix. No
page may log an error (a CSP violation, a failed fetch, an exception).

Chromium comes from Debian (`apt-get install chromium`; .ci/run installs it), never from
`playwright install`; without it these tests skip.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Route, expect, sync_playwright

from mlx_engine_server.engine import EngineClient
from mlx_engine_server.http.app import ServerOptions
from mlx_engine_server.http.guards import HostPolicy

from ..conftest import LiveServer, run_live_server, start_engine

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KEY = "browser-test-key"  # a made-up key
ROOT_PATH = "/llm"
WAIT_MS = 30_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (.ci/run installs it)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[EngineClient]:
    """One engine for both servers (each app stops it on exit: that is only at the end)."""
    engine = start_engine(tiny_model_dir)
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def server(engine: EngineClient) -> Iterator[LiveServer]:
    live = run_live_server(engine)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def keyed_server(engine: EngineClient) -> Iterator[LiveServer]:
    """Keys, and the Host check and CORS as `mlx-server` on loopback with --cors-origin has them:
    neither may get in the way of a page calling its own origin."""
    options = ServerOptions(
        api_keys=(KEY,), host_policy=HostPolicy(), cors_origins=("https://app.example",)
    )
    live = run_live_server(engine, options, root_path=ROOT_PATH)
    yield live
    live.stop()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh tab (and sessionStorage) that fails the test if the page logs an error."""
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda message: _keep_errors(message, errors))
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, errors


# Chromium logs every 4xx fetch; a 401 is how a page learns it needs the key.
EXPECTED_ERROR = "the server responded with a status of 401 (Unauthorized)"


def _keep_errors(message: ConsoleMessage, errors: list[str]) -> None:
    if message.type == "error" and EXPECTED_ERROR not in message.text:
        errors.append(message.text)


def figure(page: Page, field: str) -> int:
    return int(page.locator(f'[data-field="{field}"]').inner_text().replace(",", ""))


def test_status_page_shows_the_model_and_follows_requests(page: Page, server: LiveServer) -> None:
    page.goto(f"{server.base_url}/")
    expect(page.locator("#model-name")).to_have_text("tiny-llama")
    expect(page.locator("#state")).to_have_text("serving")
    expect(page.locator('[data-field="device"]')).to_contain_text("Device(")
    expect(page.locator('[data-field="memory_active"]')).to_contain_text("B")
    requests_before = figure(page, "requests_total")

    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "ignore_eos": True}
    assert httpx.post(f"{server.base_url}/v1/chat/completions", json=body).status_code == 200

    total = page.locator('[data-field="requests_total"]')
    expect(total).to_have_text(str(requests_before + 1), timeout=WAIT_MS)  # the next poll
    expect(page.locator('[data-field="ttft"]')).to_contain_text("ms")
    assert figure(page, "completion_tokens_total") >= 5


def send_chat(page: Page, text: str) -> None:
    page.fill("#max-tokens", "24")
    page.fill("#temperature", "0")
    page.fill("#chat-input", text)
    page.press("#chat-input", "Enter")


def test_chat_streams_an_answer_into_the_page(page: Page, server: LiveServer) -> None:
    page.goto(f"{server.base_url}/")
    expect(page.locator("#state")).to_have_text("serving")
    # Count the answer's text updates: a stream changes it many times, a whole answer once.
    page.evaluate(
        """() => {
            window.textUpdates = 0;
            new MutationObserver((changes) => { window.textUpdates += changes.length; })
                .observe(document.getElementById("transcript"),
                         {subtree: true, characterData: true, childList: true});
        }"""
    )
    send_chat(page, "Tell me a story.")
    answer = page.locator(".message.assistant").last
    expect(page.locator("#send")).to_be_enabled(timeout=WAIT_MS)
    expect(answer).not_to_have_text("…")
    assert answer.get_attribute("class") == "message assistant", answer.inner_text()
    assert answer.inner_text().strip()
    assert page.evaluate("window.textUpdates") >= 5
    expect(page.locator(".message.user")).to_have_text("Tell me a story.")


def test_docs_page_lists_every_path_of_the_openapi_document(page: Page, server: LiveServer) -> None:
    document = httpx.get(f"{server.base_url}/openapi.json").json()
    operations = [
        f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item
    ]
    page.goto(f"{server.base_url}/docs")
    toc = page.locator("#toc li")
    expect(toc).to_have_count(len(operations))
    assert toc.all_inner_texts() == operations
    chat = page.locator('[id="post-/v1/chat/completions"]')
    expect(chat).to_contain_text("Chat")
    expect(chat).to_contain_text("ChatCompletionRequest")
    expect(chat.locator(".schema li", has_text="messages").first).to_contain_text("required")


def strip_prefix_like_a_proxy(page: Page, base_url: str) -> list[str]:
    """Every request of the page goes through here: those under ROOT_PATH reach the server
    without it, as a proxy would send them; the list keeps every URL the page asked for."""
    asked: list[str] = []

    def forward(route: Route) -> None:
        url = route.request.url
        asked.append(url)
        upstream = url.replace(f"{base_url}{ROOT_PATH}/", f"{base_url}/", 1)
        route.fulfill(response=route.fetch(url=upstream))

    page.route(f"{base_url}/**", forward)
    return asked


def test_behind_root_path_with_a_key_the_page_asks_for_it_then_works(
    page: Page, keyed_server: LiveServer
) -> None:
    base = keyed_server.base_url
    asked = strip_prefix_like_a_proxy(page, base)
    page.goto(f"{base}{ROOT_PATH}/")
    expect(page.locator("#key-form")).to_be_visible()
    expect(page.locator("#key-reason")).to_contain_text("API key")

    page.fill("#key-input", KEY)
    page.click("#key-form button")
    expect(page.locator("#key-form")).to_be_hidden()
    expect(page.locator("#state")).to_have_text("serving")
    expect(page.locator("#model-name")).to_have_text("tiny-llama")
    assert page.evaluate("Object.values(sessionStorage)") == [KEY]

    send_chat(page, "Hello")
    expect(page.locator("#send")).to_be_enabled(timeout=WAIT_MS)
    answer = page.locator(".message.assistant").last
    assert answer.get_attribute("class") == "message assistant", answer.inner_text()

    page.click("nav >> text=API reference")  # the same tab: the key is still there
    expect(page.locator("#toc li").first).to_be_visible()
    expect(page.locator("#key-form")).to_be_hidden()
    assert asked
    assert all(url.startswith(f"{base}{ROOT_PATH}/") for url in asked), asked


def test_openapi_names_the_root_path_as_its_server(
    server: LiveServer, keyed_server: LiveServer
) -> None:
    """No browser needed: what an OpenAPI client reads to know where the API is."""
    headers = {"Authorization": f"Bearer {KEY}"}
    behind = httpx.get(f"{keyed_server.base_url}/openapi.json", headers=headers).json()
    assert behind["servers"] == [{"url": ROOT_PATH}]
    assert "servers" not in httpx.get(f"{server.base_url}/openapi.json").json()


def test_a_wrong_key_is_refused_and_the_form_comes_back(
    page: Page, keyed_server: LiveServer
) -> None:
    base = keyed_server.base_url
    strip_prefix_like_a_proxy(page, base)
    page.goto(f"{base}{ROOT_PATH}/docs")
    expect(page.locator("#key-form")).to_be_visible()
    page.fill("#key-input", "not-the-key")
    page.click("#key-form button")
    expect(page.locator("#key-reason")).to_have_text("That key was refused.")
    expect(page.locator("#key-form")).to_be_visible()
    expect(page.locator("#toc li")).to_have_count(0)
