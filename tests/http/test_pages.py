"""The browser pages over HTTP (no browser): what is served, with which headers, to whom; and the
recent latency percentiles /v1/mlx/status gives them. tests/http/test_browser.py runs the pages
in Chromium."""

from __future__ import annotations

import re
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from mlx_engine_server.http.app import ServerOptions, create_app
from mlx_engine_server.http.latency import RecentLatencies, nearest_rank
from mlx_engine_server.http.pages import ASSET_TYPES, CONTENT_SECURITY_POLICY, PAGES

from ..conftest import start_engine

REPO_ROOT = Path(__file__).resolve().parents[2]
KEY = "page-test-key"  # a made-up key


@pytest.fixture(scope="module")
def keyed_client(tiny_model_dir: Path) -> Iterator[TestClient]:
    """An engine of its own: leaving the client's lifespan stops the app's engine."""
    app = create_app(start_engine(tiny_model_dir), ServerOptions(api_keys=(KEY,)))
    with TestClient(app) as client:
        yield client


@pytest.mark.parametrize(("path", "marker"), [("/", 'id="chat-form"'), ("/docs", 'id="toc"')])
def test_pages_are_html_with_a_strict_content_security_policy(
    client: TestClient, path: str, marker: str
) -> None:
    response = client.get(path, headers={"accept": "text/html"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert marker in response.text
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self';" in CONTENT_SECURITY_POLICY
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"


def test_every_page_url_is_relative(client: TestClient) -> None:
    """Under --root-path the pages live below a prefix: no URL may start at the host's root."""
    for path in ("/", "/docs"):
        html = client.get(path).text
        assert 'src="/' not in html
        assert 'href="/' not in html
    for name in ("common.js", "status.js", "docs.js"):
        script = client.get(f"/static/{name}").text
        assert 'fetch("/' not in script
        assert 'apiFetch("/' not in script


@pytest.mark.parametrize("name", sorted(ASSET_TYPES))
def test_static_files_are_served_with_their_type(client: TestClient, name: str) -> None:
    response = client.get(f"/static/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"] == ASSET_TYPES[name]
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert len(response.content) > 500


@pytest.mark.parametrize("name", ["nothing.js", "..%2Fpages.py", "status.html", "__init__.py"])
def test_other_static_names_are_404_in_openai_shape(client: TestClient, name: str) -> None:
    """Only the named files: never a path into the package (`..%2F` is no route at all)."""
    response = client.get(f"/static/{name}")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_with_keys_the_pages_are_public_and_the_api_is_not(keyed_client: TestClient) -> None:
    for path in ("/", "/docs", "/static/status.js", "/static/pages.css"):
        assert keyed_client.get(path).status_code == 200, path
    for path in ("/v1/mlx/status", "/openapi.json", "/static/nothing.js", "/docs/"):
        assert keyed_client.get(path).status_code == 401, path
    headers = {"authorization": f"Bearer {KEY}"}
    assert keyed_client.get("/v1/mlx/status", headers=headers).status_code == 200


def test_status_reports_recent_latency_percentiles(client: TestClient) -> None:
    before = client.get("/v1/mlx/status").json()["latency"]
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "ignore_eos": True}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    latency = client.get("/v1/mlx/status").json()["latency"]
    assert latency["window_s"] == 60
    assert latency["ttft_s"]["count"] == before["ttft_s"]["count"] + 1
    assert latency["itl_s"]["count"] >= before["itl_s"]["count"] + 1
    for summary in (latency["ttft_s"], latency["itl_s"]):
        assert 0 < summary["p50"] <= summary["p90"] <= summary["p99"] < 60


def test_recent_latencies_forget_samples_past_the_window() -> None:
    recent = RecentLatencies(window_s=10)
    assert recent.summary(now=0) == {"count": 0, "p50": None, "p90": None, "p99": None}
    for second in range(10):
        recent.add(0.1 * (second + 1), now=second)
    assert recent.summary(now=9) == {"count": 10, "p50": 0.5, "p90": 0.9, "p99": 1.0}
    assert recent.summary(now=15)["count"] == 5  # the samples of seconds 5..9 remain
    assert recent.summary(now=100)["count"] == 0


def test_recent_latencies_keep_a_bounded_number_of_samples() -> None:
    recent = RecentLatencies(window_s=10, max_samples=3)
    for sample in (5.0, 1.0, 2.0, 3.0):
        recent.add(sample, now=0)
    assert recent.summary(now=0)["count"] == 3
    assert recent.summary(now=0)["p99"] == 3.0  # the oldest, 5.0, went first


def test_nearest_rank() -> None:
    assert nearest_rank([1, 2, 3, 4], 50) == 2
    assert nearest_rank([1, 2, 3, 4], 99) == 4
    assert nearest_rank([7], 1) == 7


def test_every_static_file_is_served_and_shipped() -> None:
    """Each file of http/static/ is a page or a named asset, and pyproject's package data
    (matched with the same globs setuptools uses) puts it in the wheel."""
    static = REPO_ROOT / "src" / "mlx_engine_server" / "http" / "static"
    names = {path.name for path in static.iterdir()}
    assert names == set(PAGES.values()) | set(ASSET_TYPES)
    pyproject = (REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8")
    package_data = re.search(r"^mlx_engine_server = \[(.*?)\]", pyproject, re.M)
    assert package_data, "pyproject.toml declares no package data"
    globs = re.findall(r'"([^"]+)"', package_data.group(1))
    for name in names:
        assert any(fnmatch(f"http/static/{name}", pattern) for pattern in globs), name
