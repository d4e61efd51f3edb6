"""Web pages of other origins cannot drive the server: requests as a browser sends them, over
real HTTP. A cross-site "simple" POST (text/plain, no preflight) is refused by its Origin; a
body that is not JSON is refused by its Content-Type, whoever sends it."""

from __future__ import annotations

import functools
import http.client
import json
import logging
import shutil
import subprocess
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from starlette.testclient import TestClient

from ..conftest import LiveServer

CHAT = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
JSON_ROUTES = [
    "/v1/chat/completions",
    "/v1/completions",
    "/tokenize",
    "/detokenize",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/responses",
]


def browser_post(
    server: LiveServer, path: str, body: str, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    """A POST with the headers a browser's fetch() sends, and no others."""
    connection = http.client.HTTPConnection(server.base_url.removeprefix("http://"), timeout=30)
    connection.request("POST", path, body=body.encode(), headers=headers)
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()
    return response.status, answer


def requests_admitted(server: LiveServer) -> int:
    status = httpx.get(f"{server.base_url}/v1/mlx/status").json()
    total: int = status["counters"]["requests_total"]
    return total


def test_cross_site_simple_request_is_refused_before_it_generates(
    tiny_server: LiveServer,
) -> None:
    before = requests_admitted(tiny_server)
    status, answer = browser_post(
        tiny_server,
        "/v1/chat/completions",
        CHAT,
        {
            "Origin": "http://evil.example",
            "Content-Type": "text/plain;charset=UTF-8",
            "Referer": "http://evil.example/page.html",
            "Sec-Fetch-Mode": "no-cors",
            "Sec-Fetch-Site": "cross-site",
        },
    )
    assert status == 403
    assert answer["error"]["code"] == "origin_not_allowed"
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert requests_admitted(tiny_server) == before


@pytest.mark.parametrize("origin", ["null", "http://localhost.evil.example", "file://"])
def test_other_origins_are_refused_on_every_path(tiny_server: LiveServer, origin: str) -> None:
    for path in ("/v1/models", "/health"):
        response = httpx.get(f"{tiny_server.base_url}{path}", headers={"Origin": origin})
        assert response.status_code == 403, path
        assert response.json()["error"]["code"] == "origin_not_allowed"


def test_a_page_served_by_the_server_itself_may_call_it(tiny_server: LiveServer) -> None:
    """Same origin: the Origin names the Host the request was sent to."""
    status, answer = browser_post(
        tiny_server,
        "/v1/chat/completions",
        CHAT,
        {"Origin": tiny_server.base_url, "Content-Type": "application/json"},
    )
    assert status == 200, answer
    assert answer["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize(
    "content_type",
    ["text/plain;charset=UTF-8", "application/x-www-form-urlencoded", "multipart/form-data"],
)
def test_a_body_that_is_not_json_is_415_on_every_json_route(
    tiny_server: LiveServer, content_type: str
) -> None:
    for path in JSON_ROUTES:
        status, answer = browser_post(tiny_server, path, CHAT, {"Content-Type": content_type})
        assert status == 415, path
        if path.startswith("/v1/messages"):  # Anthropic's error shape
            assert answer["error"]["type"] == "invalid_request_error", path
        else:
            assert answer["error"]["code"] == "unsupported_media_type", path
            assert "application/json" in answer["error"]["message"]


@pytest.mark.parametrize(
    "headers",
    [{"Content-Type": "application/json; charset=utf-8"}, {"Content-Type": "Application/JSON"}, {}],
)
def test_json_with_parameters_or_no_content_type_is_accepted(
    client: TestClient, headers: dict[str, str]
) -> None:
    response = client.post("/tokenize", content=json.dumps({"prompt": "Hi"}), headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["count"] >= 1


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ATTACK_PAGE = """<html><body><script>
fetch("{target}/v1/chat/completions", {{
  method: "POST", mode: "no-cors", headers: {{"Content-Type": "text/plain"}}, body: {body}
}});
</script></body></html>"""


def chat_requests_logged(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The access log's chat completion lines."""
    fields = [getattr(record, "fields", {}) for record in caplog.records]
    return [line for line in fields if line.get("path") == "/v1/chat/completions"]


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (.ci/run installs it)")
def test_a_real_browser_on_another_site_cannot_drive_generation(
    tiny_server: LiveServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Headless Chromium loads a page of another origin that posts a chat as text/plain."""
    (tmp_path / "page.html").write_text(
        ATTACK_PAGE.format(target=tiny_server.base_url, body=json.dumps(CHAT)), encoding="utf-8"
    )
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    site = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    admitted = requests_admitted(tiny_server)
    page = f"http://localhost:{site.server_address[1]}/page.html"  # another origin
    command = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu"]
    try:
        with caplog.at_level(logging.INFO, logger="mlx_engine_server.access"):
            subprocess.run(
                [*command, "--virtual-time-budget=3000", "--dump-dom", page],
                capture_output=True,
                timeout=60,
                check=True,
            )
            deadline = time.monotonic() + 10
            while not chat_requests_logged(caplog):
                assert time.monotonic() < deadline, "the browser's request never arrived"
                time.sleep(0.1)
    finally:
        site.shutdown()
        site.server_close()
    (line,) = chat_requests_logged(caplog)
    assert (line["status"], line["error_code"]) == (403, "origin_not_allowed")
    assert requests_admitted(tiny_server) == admitted
