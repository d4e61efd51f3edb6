"""examples/nginx/nginx.conf, run by real nginx on loopback in front of two real instances."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from mlx_engine_server.http.app import ServerOptions
from mlx_engine_server.http.guards import HostPolicy

from ..cli.test_cli import REPO_ROOT, free_port
from ..conftest import LiveServer, run_live_server, start_engine
from .test_operations import ACCESS_LOGGER, access_records, fields_of

EXAMPLE = REPO_ROOT / "examples" / "nginx" / "nginx.conf"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (Debian package `nginx`; .ci/run installs it)"
)
START_TIMEOUT_S = 20.0


@dataclass
class Proxy:
    base_url: str
    instances: list[LiveServer]

    def port_of(self, response: httpx.Response) -> int:
        """Which instance answered: nginx's X-Upstream header (its last attempt)."""
        return int(response.headers["x-upstream"].split(",")[-1].strip().rsplit(":", 1)[1])


def configure(work: Path, instance_ports: list[int], listen_port: int) -> Path:
    """The example, with free ports in place of 8001, 8002 and 8080 (each must be there once)."""
    text = EXAMPLE.read_text(encoding="utf-8")
    for old, new in [
        ("127.0.0.1:8001 ", f"127.0.0.1:{instance_ports[0]} "),
        ("127.0.0.1:8002 ", f"127.0.0.1:{instance_ports[1]} "),
        ("listen 127.0.0.1:8080;", f"listen 127.0.0.1:{listen_port};"),
    ]:
        assert text.count(old) == 1, f"the example no longer has {old!r}"
        text = text.replace(old, new)
    path = work / "nginx.conf"
    path.write_text(text, encoding="utf-8")
    return path


def wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"nginx exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    pytest.fail("nginx did not open its port")


@pytest.fixture(scope="module")
def proxy(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    assert NGINX is not None
    # As serve() runs them on loopback: the Host check is on, so nginx must send a loopback Host.
    # And as the example's comment starts them: nginx's X-Forwarded-For is believed.
    options = ServerOptions(host_policy=HostPolicy())
    instances = [
        run_live_server(start_engine(tiny_model_dir), options, forwarded_allow_ips="127.0.0.1")
        for _ in range(2)
    ]
    work = tmp_path_factory.mktemp("nginx")
    os.chmod(work, 0o755)  # noqa: S103 - worker processes (another user under root) read it
    listen_port = free_port()
    ports = [int(live.base_url.rsplit(":", 1)[1]) for live in instances]
    config = configure(work, ports, listen_port)
    command = [NGINX, "-p", str(work), "-c", str(config), "-e", "stderr"]
    if os.geteuid() == 0:
        command += ["-g", "user root;"]  # workers may then use the temp dirs under tmp_path
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        wait_for_port(listen_port, process)
        yield Proxy(f"http://127.0.0.1:{listen_port}", instances)
    finally:
        process.terminate()
        process.wait(timeout=10)
        for live in instances:
            live.stop()


def chat(proxy: Proxy, session: str | None = None, **fields: object) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **fields}
    headers = {"X-Session-ID": session} if session else {}
    return httpx.post(
        f"{proxy.base_url}/v1/chat/completions", json=body, headers=headers, timeout=60
    )


def test_a_completion_through_nginx_keeps_the_request_id(proxy: Proxy) -> None:
    response = httpx.post(
        f"{proxy.base_url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        headers={"X-Request-ID": "through-nginx-1"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion"
    assert response.headers["x-request-id"] == "through-nginx-1"
    assert response.headers["x-mlx-cached-tokens"].isdigit()
    assert httpx.get(f"{proxy.base_url}/health", timeout=10).json()["status"] == "ok"


def test_the_instances_see_the_clients_address_not_nginxs_nor_a_forged_one(
    proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    """The client connects from 127.0.0.2 (any 127/8 address is loopback), nginx from 127.0.0.1.
    nginx appends the client's address to the X-Forwarded-For the client sent; the instance
    believes only what its trusted proxy added, so a forged first entry is skipped."""
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    with (
        caplog.at_level(logging.INFO, logger=ACCESS_LOGGER),
        httpx.Client(transport=transport, timeout=60) as client,
    ):
        forged = {"X-Forwarded-For": "203.0.113.9", "X-Request-ID": "nginx-client-address"}
        response = client.get(f"{proxy.base_url}/v1/models", headers=forged)
        assert response.status_code == 200, response.text
        # The access line is written after the answer has gone: wait for it while the log level
        # still lets it through.
        deadline = time.monotonic() + 10
        while not (records := _records_with_id(caplog, "nginx-client-address")):
            assert time.monotonic() < deadline, "no access-log line for the request"
            time.sleep(0.05)
    (record,) = records
    assert fields_of(record)["client"] == "127.0.0.2"


def _records_with_id(caplog: pytest.LogCaptureFixture, request_id: str) -> list[Any]:
    return [
        record for record in access_records(caplog) if fields_of(record)["request_id"] == request_id
    ]


def test_the_status_pages_own_posts_pass_the_origin_check_through_nginx(proxy: Proxy) -> None:
    """A browser on the proxied page sends Origin: the proxy's; nginx sends Host: localhost.
    The page's chat box got 403 origin_not_allowed; another site's page still does."""
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    url = f"{proxy.base_url}/v1/chat/completions"
    own = httpx.post(url, json=body, headers={"Origin": proxy.base_url}, timeout=60)
    assert own.status_code == 200, own.text
    other = httpx.post(url, json=body, headers={"Origin": "http://evil.test"}, timeout=60)
    assert other.status_code == 403
    assert other.json()["error"]["code"] == "origin_not_allowed"


def test_streaming_through_nginx_arrives_event_by_event(proxy: Proxy) -> None:
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 40,
        "ignore_eos": True,
        "stream": True,
    }
    arrivals: list[float] = []
    payloads: list[str] = []
    url = f"{proxy.base_url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic())
                payloads.append(line.removeprefix("data: "))
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in payloads[:-1]]
    assert sum(1 for chunk in chunks if chunk["choices"] and chunk["choices"][0]["delta"]) >= 10
    # Buffered, every event would arrive in one burst at the end.
    assert arrivals[-1] - arrivals[0] > 0.05, arrivals


def test_same_session_same_instance_and_sessions_spread(proxy: Proxy) -> None:
    first = {proxy.port_of(chat(proxy, "conversation-7")) for _ in range(4)}
    assert len(first) == 1
    spread = {proxy.port_of(chat(proxy, f"conversation-{n}")) for n in range(8)}
    assert len(spread) == 2


def test_repeat_turn_reuses_the_prefix_cache_of_its_instance(proxy: Proxy) -> None:
    long_turn = "Tell me about the history of the city of Paris. " * 3
    body_fields = {"messages": [{"role": "user", "content": long_turn}], "temperature": 0}
    chat(proxy, "cache-session", **body_fields)
    again = chat(proxy, "cache-session", **body_fields)
    assert int(again.headers["x-mlx-cached-tokens"]) > 0


def test_a_dead_instance_is_skipped(proxy: Proxy) -> None:
    """Last: stops one instance. Its sessions move to the other one; nothing fails."""
    victim = proxy.instances[0]
    victim_port = int(victim.base_url.rsplit(":", 1)[1])
    sessions = [f"conversation-{n}" for n in range(8)]
    on_victim = [s for s in sessions if proxy.port_of(chat(proxy, s)) == victim_port]
    assert on_victim
    victim.stop()
    for session in on_victim:
        response = chat(proxy, session)
        assert response.status_code == 200, response.text
        assert proxy.port_of(response) != victim_port
