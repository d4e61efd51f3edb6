"""The `mlx-server` command: settings precedence, bad values, exit codes, one real process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from click.testing import CliRunner
from pydantic import SecretStr
from starlette.testclient import TestClient

from mlx_engine_server.cli.config import DEFAULT_CACHE_DIR, load_settings
from mlx_engine_server.cli.main import EXIT_BAD_SETTINGS, cli
from mlx_engine_server.cli.options import api_keys
from mlx_engine_server.cli.settings_errors import SettingsError
from mlx_engine_server.http.app import ServerOptions, create_app

from ..conftest import TINY_CONTEXT_WINDOW, start_engine
from .test_docs import readme_settings_rows

REPO_ROOT = Path(__file__).resolve().parents[2]
MLX_SERVER = str(Path(sys.executable).parent / "mlx-server")
FAST_EXIT_S = 10.0
READY_TIMEOUT_S = 60.0
SIGTERM_EXIT_S = 20.0


@pytest.fixture(autouse=True)
def _no_outside_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings of the shell running the tests must not leak into them."""
    for name in list(os.environ):
        if name.startswith("MLX_SERVER_"):
            monkeypatch.delenv(name)


def write_config(tmp_path: Path, values: Any, name: str = "settings.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(values), encoding="utf-8")
    return path


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_SERVER_")}
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env.update(extra)
    return env


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    elapsed_s: float


def run_cli(*args: str, env: dict[str, str] | None = None, timeout_s: float = 120) -> Outcome:
    started = time.monotonic()
    done = subprocess.run(
        [MLX_SERVER, *args],
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    return Outcome(done.returncode, done.stdout, done.stderr, time.monotonic() - started)


# --- load_settings: precedence ----------------------------------------------------------------


@dataclass(frozen=True)
class Layers:
    """A setting's value at each layer, CLI as click passes it; `expected` when parsing changes it.

    Each layer's value differs from the one below, so each step proves that the layer won.
    """

    name: str
    default: Any
    file_value: Any
    env_value: str
    cli_value: Any
    expected: tuple[Any, Any, Any, Any] | None = None

    def wanted(self) -> tuple[Any, Any, Any, Any]:
        return self.expected or (self.default, self.file_value, self.env_value, self.cli_value)


PRECEDENCE = [
    Layers("port", 8000, 1111, "2222", "3333", (8000, 1111, 2222, 3333)),
    Layers("host", "127.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.3"),
    Layers("max_queue", 64, 5, "6", "7", (64, 5, 6, 7)),
    Layers("strict_model_name", False, True, "false", True, (False, True, False, True)),
    Layers("log_level", "info", "debug", "WARNING", "error", ("info", "debug", "warning", "error")),
]


@pytest.mark.parametrize("layers", PRECEDENCE, ids=[layers.name for layers in PRECEDENCE])
def test_cli_beats_env_beats_file_beats_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layers: Layers
) -> None:
    name = layers.name
    default, from_file, from_env, from_cli = layers.wanted()
    assert getattr(load_settings({}), name) == default
    config = write_config(tmp_path, {name: layers.file_value})
    assert getattr(load_settings({}, config), name) == from_file
    monkeypatch.setenv(f"MLX_SERVER_{name.upper()}", layers.env_value)
    assert getattr(load_settings({}, config), name) == from_env
    assert getattr(load_settings({name: layers.cli_value}, config), name) == from_cli
    # CLI also beats env with no file, and env beats the default with no file.
    assert getattr(load_settings({name: layers.cli_value}), name) == from_cli
    assert getattr(load_settings({}), name) == from_env


def test_defaults_are_the_documented_ones() -> None:
    settings = load_settings({})
    assert settings.model_path is None
    assert settings.adapter_path is None
    assert settings.model_id is None
    assert (settings.host, settings.port, settings.log_level) == ("127.0.0.1", 8000, "info")
    assert settings.strict_model_name is False
    assert settings.trust_remote_code is False
    assert settings.cache_dir == DEFAULT_CACHE_DIR
    assert (settings.max_batch_size, settings.max_queue, settings.prefill_step_size) == (
        32,
        64,
        512,
    )
    assert settings.request_timeout_s == 600
    assert settings.max_tokens_default is None


ENV_CASES = [
    ("MODEL_PATH", "/models/x", "model_path", "/models/x"),
    ("ADAPTER_PATH", "/adapters/y", "adapter_path", "/adapters/y"),
    ("HOST", "0.0.0.0", "host", "0.0.0.0"),
    ("PORT", "1234", "port", 1234),
    ("MODEL_ID", "env-model", "model_id", "env-model"),
    ("LOG_LEVEL", "DEBUG", "log_level", "debug"),
    ("STRICT_MODEL_NAME", "true", "strict_model_name", True),
    ("TRUST_REMOTE_CODE", "1", "trust_remote_code", True),
    ("CACHE_DIR", "/var/cache/mlx-x", "cache_dir", Path("/var/cache/mlx-x")),
    ("GGUF_REQUANTIZE", "8", "gguf_requantize", "8"),
    ("DTYPE", "bfloat16", "dtype", "bfloat16"),
    ("MAX_BATCH_SIZE", "3", "max_batch_size", 3),
    ("MAX_QUEUE", "0", "max_queue", 0),
    ("PREFILL_STEP_SIZE", "64", "prefill_step_size", 64),
    ("REQUEST_TIMEOUT_S", "2.5", "request_timeout_s", 2.5),
    ("PREFIX_CACHE_BYTES", "0", "prefix_cache_bytes", 0),
    ("SHUTDOWN_GRACE_S", "2.5", "shutdown_grace_s", 2.5),
    ("MEMORY_BUDGET_BYTES", "1000000000", "memory_budget_bytes", 1_000_000_000),
    ("SPECULATIVE", "ngram", "speculative", "ngram"),
    ("DRAFT_MODEL", "/models/small", "draft_model", "/models/small"),
    ("NUM_DRAFT_TOKENS", "7", "num_draft_tokens", 7),
    ("NGRAM_SIZE", "2", "ngram_size", 2),
    ("NGRAM_MIN_SIZE", "2", "ngram_min_size", 2),
    ("KV_BITS", "8", "kv_bits", 8),
    ("KV_GROUP_SIZE", "32", "kv_group_size", 32),
    ("MAX_TOKENS_DEFAULT", "17", "max_tokens_default", 17),
    ("CONTEXT_OVERFLOW", "summarize", "context_overflow", "summarize"),
    ("ALLOW_REQUEST_OVERFLOW_POLICY", "true", "allow_request_overflow_policy", True),
    ("SUMMARY_KEEP_MESSAGES", "2", "summary_keep_messages", 2),
    ("SUMMARY_MAX_TOKENS", "40", "summary_max_tokens", 40),
    ("TOOL_CALL_PARSER", "llama3", "tool_call_parser", "llama3"),
    ("REASONING_PARSER", "none", "reasoning_parser", "none"),
    ("MAX_N", "4", "max_n", 4),
    ("MAX_PROMPTS", "5", "max_prompts", 5),
    ("API_KEYS", "key-one, key-two", "api_keys", [SecretStr("key-one"), SecretStr("key-two")]),
    ("ALLOWED_HOSTS", "llm.lan,box", "allowed_hosts", ["llm.lan", "box"]),
    ("CORS_ORIGINS", "https://a.example", "cors_origins", ["https://a.example"]),
    ("MAX_BODY_BYTES", "4096", "max_body_bytes", 4096),
    ("MAX_HEADER_BYTES", "2048", "max_header_bytes", 2048),
    ("MAX_JSON_DEPTH", "8", "max_json_depth", 8),
    ("HEADER_TIMEOUT_S", "1.5", "header_timeout_s", 1.5),
    ("BODY_TIMEOUT_S", "2.5", "body_timeout_s", 2.5),
    ("MAX_CONNECTIONS", "100", "max_connections", 100),
    ("MAX_MESSAGES", "3", "max_messages", 3),
    ("MAX_STOP_SEQUENCES", "2", "max_stop_sequences", 2),
    ("MAX_STOP_CHARS", "5", "max_stop_chars", 5),
    ("MAX_LOGIT_BIAS", "7", "max_logit_bias", 7),
    ("STATE_DIR", "/var/lib/mlx-state", "state_dir", Path("/var/lib/mlx-state")),
    ("STATE_URL", "redis://cache:6379/2", "state_url", "redis://cache:6379/2"),
    ("STATE_RETENTION_S", "3600", "state_retention_s", 3600.0),
    ("STATE_MAX_RECORDS", "50", "state_max_records", 50),
    ("SESSION_TTL_S", "90", "session_ttl_s", 90.0),
    ("RATE_LIMIT_RPM", "60", "rate_limit_rpm", 60),
    ("RATE_LIMIT_TPM", "9000", "rate_limit_tpm", 9000),
    ("LOG_FORMAT", "json", "log_format", "json"),
    ("LOG_PROMPTS", "true", "log_prompts", True),
    ("ROOT_PATH", "/llm/v2", "root_path", "/llm/v2"),
    ("FORWARDED_ALLOW_IPS", "10.0.0.1, 10.1.0.0/16", "forwarded_allow_ips", "10.0.0.1,10.1.0.0/16"),
    ("READY_FILE", "/run/app/ready.json", "ready_file", Path("/run/app/ready.json")),
    ("UDS", "/run/app/mlx.sock", "uds", Path("/run/app/mlx.sock")),
    ("PARENT_PID", "4242", "parent_pid", 4242),
    ("EXIT_ON_STDIN_CLOSE", "1", "exit_on_stdin_close", True),
    ("QUIET", "true", "quiet", True),
    ("ALLOWED_MEDIA_DIR", "/", "allowed_media_dir", (Path("/"),)),
    ("ALLOW_REMOTE_MEDIA", "true", "allow_remote_media", True),
    ("MAX_IMAGE_BYTES", "1000", "max_image_bytes", 1000),
    ("MAX_IMAGE_PIXELS", "4096", "max_image_pixels", 4096),
    ("MAX_IMAGES_PER_REQUEST", "2", "max_images_per_request", 2),
    ("IMAGE_FORMATS", "PNG,gif", "image_formats", ("png", "gif")),
    ("REMOTE_MEDIA_TIMEOUT_S", "2.5", "remote_media_timeout_s", 2.5),
    ("DISTRIBUTED_MODE", "pipeline", "distributed_mode", "pipeline"),
    ("DISTRIBUTED_TIMEOUT_S", "7.5", "distributed_timeout_s", 7.5),
]


def test_api_key_file_env_var_reaches_its_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Kept apart from ENV_CASES: the file must exist to be a valid setting."""
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nfile-key-1\n\n  file-key-2  \n", encoding="utf-8")
    monkeypatch.setenv("MLX_SERVER_API_KEY_FILE", str(keys))
    monkeypatch.setenv("MLX_SERVER_API_KEYS", "env-key")
    settings = load_settings({"api_keys": ("cli-key",)})
    assert settings.api_key_file == keys
    assert api_keys(settings) == ("cli-key", "file-key-1", "file-key-2")


@pytest.mark.parametrize(("env_suffix", "raw", "field", "expected"), ENV_CASES)
def test_every_env_var_reaches_its_setting(
    monkeypatch: pytest.MonkeyPatch, env_suffix: str, raw: str, field: str, expected: Any
) -> None:
    monkeypatch.setenv(f"MLX_SERVER_{env_suffix}", raw)
    assert getattr(load_settings({}), field) == expected


def test_env_cases_cover_every_documented_env_var() -> None:
    documented = {
        row.env.removeprefix("MLX_SERVER_") for row in readme_settings_rows() if row.field
    }
    assert documented == {case[0] for case in ENV_CASES} | {"API_KEY_FILE"}


def test_cache_dir_expands_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLX_SERVER_CACHE_DIR", "~/somewhere")
    assert load_settings({}).cache_dir == Path.home() / "somewhere"


# --- load_settings: bad values ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("cli_values", "named"),
    [
        ({"port": "70000"}, "port"),
        ({"port": "abc"}, "port"),
        ({"port": "-1"}, "port"),
        ({"max_batch_size": "0"}, "max_batch_size"),
        ({"max_queue": "-1"}, "max_queue"),
        ({"log_level": "loud"}, "log_level"),
        ({"request_timeout_s": "0"}, "request_timeout_s"),
        ({"max_tokens_default": "0"}, "max_tokens_default"),
        ({"host": ""}, "host"),
        ({"context_overflow": "compress"}, "context_overflow"),
        ({"summary_max_tokens": "0"}, "summary_max_tokens"),
    ],
)
def test_bad_cli_value_is_one_line_naming_the_setting(
    cli_values: dict[str, Any], named: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(cli_values)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"invalid settings: {named}:"), message


def test_bad_env_value_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLX_SERVER_PREFILL_STEP_SIZE", "lots")
    with pytest.raises(SettingsError, match=r"^invalid settings: prefill_step_size: .*'lots'"):
        load_settings({})


def test_good_cli_value_overrides_a_bad_env_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLX_SERVER_PORT", "abc")
    assert load_settings({"port": "9000"}).port == 9000


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"port": "abc", "max_queue": "-5"})
    assert "port:" in str(caught.value)
    assert "max_queue:" in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"port": 8000, "bogus": 1}', r"bogus: unknown setting"),
        ('{"port": "abc"}', r"port: .*'abc'"),
        ('{"max_batch_size": 0}', r"max_batch_size: "),
        ("[1, 2]", r"must hold a JSON object"),
        ('"just a string"', r"must hold a JSON object"),
        ("{not json", r"not valid JSON"),
        ("", r"not valid JSON"),
    ],
    ids=["unknown-key", "bad-port", "bad-batch", "array", "string", "invalid", "empty"],
)
def test_bad_config_file_is_a_settings_error(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "settings.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(SettingsError, match=expected) as caught:
        load_settings({}, path)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("typed", ["~/no-such-pictures", "/no/such/pictures"])
def test_bad_media_dir_is_printed_as_typed(typed: str) -> None:
    """A repeated flag reaches the settings as a tuple; the message shows the folder typed."""
    result = CliRunner().invoke(cli, ["--allowed-media-dir", typed])
    assert result.exit_code == EXIT_BAD_SETTINGS, result.output
    expected = f"mlx-server: invalid settings: allowed_media_dir: {typed} is not a directory\n"
    assert result.output == expected


def test_bad_list_value_is_shown_as_typed() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"image_formats": "png,bmp"})
    assert "('" not in str(caught.value)
    assert "'bmp'" in str(caught.value)


def test_missing_config_file_is_a_settings_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(SettingsError, match=r"config file .*missing\.json: not found"):
        load_settings({}, missing)


# --- the click command, in process (never reaches serve(): every case has a bad setting) -----


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--port", "70000"], {}, "port"),
        (["--max-batch-size", "0"], {}, "max_batch_size"),
        (["--log-level", "loud"], {}, "log_level"),
        ([], {"MLX_SERVER_MAX_QUEUE": "many"}, "max_queue"),
    ],
)
def test_command_exits_2_on_bad_setting(args: list[str], env: dict[str, str], named: str) -> None:
    result = CliRunner().invoke(cli, args, env=env)
    assert result.exit_code == EXIT_BAD_SETTINGS, result.output
    assert f"mlx-server: invalid settings: {named}:" in result.output


def test_config_file_from_env_var_is_read(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"port": "not-a-port"})
    result = CliRunner().invoke(cli, [], env={"MLX_SERVER_CONFIG": str(config)})
    assert result.exit_code == EXIT_BAD_SETTINGS, result.output
    assert "port:" in result.output


def test_config_file_that_is_not_an_object_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text("[1, 2]", encoding="utf-8")
    result = CliRunner().invoke(cli, ["--config", str(path)])
    assert result.exit_code == EXIT_BAD_SETTINGS, (result.output, result.exception)
    assert "must hold a JSON object" in result.output


def test_cli_flag_beats_a_bad_config_value(tmp_path: Path) -> None:
    """The flag wins before validation: a bad file value that a flag overrides is no error."""
    config = write_config(tmp_path, {"port": "abc"})
    settings = load_settings({"port": "1"}, config)
    assert settings.port == 1


# --- real subprocesses: exit codes ----------------------------------------------------------


def assert_clean_failure(outcome: Outcome, code: int, *needles: str) -> None:
    assert outcome.returncode == code, (outcome.returncode, outcome.stderr)
    assert "Traceback" not in outcome.stderr, outcome.stderr
    # Start-up logs its phases first (model path, loading); the failure is the last word.
    last_line = outcome.stderr.strip().splitlines()[-1]
    assert last_line.startswith("mlx-server: "), outcome.stderr
    for needle in needles:
        assert needle in outcome.stderr, outcome.stderr


def test_bad_port_flag_exits_2_fast() -> None:
    outcome = run_cli("--port", "abc")
    assert_clean_failure(outcome, 2, "port", "'abc'")
    assert outcome.elapsed_s < FAST_EXIT_S


def test_bad_port_env_exits_2() -> None:
    outcome = run_cli(env=clean_env(MLX_SERVER_PORT="abc"))
    assert_clean_failure(outcome, 2, "port")
    assert outcome.elapsed_s < FAST_EXIT_S


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    outcome = run_cli("--config", str(tmp_path / "missing.json"))
    assert_clean_failure(outcome, 2, "missing.json", "not found")
    assert outcome.elapsed_s < FAST_EXIT_S


def test_missing_model_path_exits_1(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    outcome = run_cli(str(missing), "--cache-dir", str(tmp_path / "cache"))
    assert_clean_failure(outcome, 1, "no-such-model", "not found")


def test_missing_adapter_exits_1(tmp_path: Path, tiny_model_dir: Path) -> None:
    missing = tmp_path / "no-such-adapter"
    outcome = run_cli(
        str(tiny_model_dir), "--adapter-path", str(missing), "--cache-dir", str(tmp_path)
    )
    assert_clean_failure(outcome, 1, "adapter", "no-such-adapter")


def test_port_in_use_exits_5_before_loading_the_model(tmp_path: Path) -> None:
    """The model path does not exist either: the address is checked first, and at once."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        outcome = run_cli(str(tmp_path / "no-such-model"), "--port", port)
    assert_clean_failure(outcome, 5, f"cannot listen on 127.0.0.1:{port}", "already in use")
    assert outcome.elapsed_s < FAST_EXIT_S


def test_unusable_unix_socket_exits_5(tmp_path: Path) -> None:
    where = tmp_path / "no-such-dir" / "mlx.sock"
    outcome = run_cli(str(tmp_path / "no-such-model"), "--uds", str(where))
    assert_clean_failure(outcome, 5, f"cannot listen on {where}")


def test_help_lists_every_flag_in_readme() -> None:
    outcome = run_cli("--help")
    assert outcome.returncode == 0, outcome.stderr
    for row in readme_settings_rows():
        assert row.flag in outcome.stdout, row.flag


# --- one real server process ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def wait_until_healthy(server: ServerProcess) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"mlx-server exited with {server.process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"mlx-server was not healthy within {READY_TIMEOUT_S} s:\n{server.log()}")


@pytest.fixture(scope="module")
def server_process(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """`mlx-server` on the tiny model; the flag, an env var and a config file each set something.

    model_id: flag > env > file; max_queue: env > file; max_batch_size, max_tokens_default,
    context_overflow: file; allow_request_overflow_policy: flag.
    """
    work = tmp_path_factory.mktemp("server-process")
    settings = {"model_id": "file-id", "max_queue": 99, "max_batch_size": 3}
    config = write_config(
        work, {**settings, "max_tokens_default": 2, "context_overflow": "truncate"}
    )
    port = free_port()
    log_path = work / "server.log"
    env = clean_env(MLX_SERVER_MODEL_ID="env-id", MLX_SERVER_MAX_QUEUE="5")
    args = [str(tiny_model_dir), "--port", str(port), "--model-id", "tiny-test"]
    args += ["--cache-dir", str(work / "cache"), "--config", str(config)]
    args += ["--allow-request-overflow-policy"]
    with log_path.open("wb") as log:
        process = subprocess.Popen([MLX_SERVER, *args], env=env, stdout=log, stderr=log)
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_until_healthy(server)
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def test_process_reports_the_model(server_process: ServerProcess) -> None:
    models = httpx.get(f"{server_process.base_url}/v1/models", timeout=10).json()
    assert [card["id"] for card in models["data"]] == ["tiny-test"]
    assert models["data"][0]["context_window"] == TINY_CONTEXT_WINDOW


def test_process_settings_come_from_env_and_config_file(server_process: ServerProcess) -> None:
    status = httpx.get(f"{server_process.base_url}/v1/mlx/status", timeout=10).json()
    assert status["model"]["id"] == "tiny-test"
    assert status["engine"]["max_queue"] == 5
    assert status["engine"]["max_batch_size"] == 3


def test_process_answers_a_chat_completion(server_process: ServerProcess) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}
    reply = httpx.post(f"{server_process.base_url}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert data["model"] == "tiny-test"
    assert 1 <= data["usage"]["completion_tokens"] <= 3


def test_process_uses_max_tokens_default_from_config_file(server_process: ServerProcess) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "seed": 1}
    reply = httpx.post(f"{server_process.base_url}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert data["usage"]["completion_tokens"] <= 2
    if data["usage"]["completion_tokens"] == 2:
        assert data["choices"][0]["finish_reason"] == "length"


def test_process_applies_the_context_overflow_settings(server_process: ServerProcess) -> None:
    old_turns = [
        {"role": "user", "content": "fig " * 300},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "Hi"},
    ]
    url = f"{server_process.base_url}/v1/chat/completions"
    body = {"messages": old_turns, "max_tokens": 2, "temperature": 0}
    truncated = httpx.post(url, json=body, timeout=60)
    assert truncated.status_code == 200, truncated.text
    assert truncated.headers["x-context-compacted"] == "truncate; dropped=2"
    refused = httpx.post(url, json={**body, "context_overflow": "error"}, timeout=60)
    assert refused.json()["error"]["code"] == "context_length_exceeded"


def test_example_client_runs_against_the_process(server_process: ServerProcess) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "examples" / "client.py"),
            "--base-url",
            f"{server_process.base_url}/v1",
            "--max-tokens",
            "3",
        ],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "non-streaming:" in done.stdout
    assert "streaming:" in done.stdout.replace("non-streaming:", "")


def test_sigterm_exits_0(server_process: ServerProcess) -> None:
    """Last test of the module: it ends the shared process. Exit 134 means MLX aborted at exit."""
    server_process.process.send_signal(signal.SIGTERM)
    try:
        code = server_process.process.wait(timeout=SIGTERM_EXIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"mlx-server still running {SIGTERM_EXIT_S} s after SIGTERM")
    log = server_process.log()
    assert code == 0, log
    assert "Traceback" not in log, log


# --- strict model name, in process ----------------------------------------------------------


@pytest.fixture(scope="module")
def strict_client(tiny_model_dir: Path) -> Iterator[TestClient]:
    engine = start_engine(tiny_model_dir)
    app = create_app(engine, ServerOptions(strict_model_name=True))
    with TestClient(app) as client:
        yield client


def test_strict_model_name_refuses_another_model(strict_client: TestClient) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    reply = strict_client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 404, reply.text
    error = reply.json()["error"]
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert "gpt-4o" in error["message"]


def test_strict_model_name_refuses_another_model_for_completions(
    strict_client: TestClient,
) -> None:
    body = {"model": "other", "prompt": "Hi", "max_tokens": 2}
    reply = strict_client.post("/v1/completions", json=body)
    assert reply.status_code == 404, reply.text
    assert reply.json()["error"]["code"] == "model_not_found"


def test_strict_model_name_accepts_the_served_model(strict_client: TestClient) -> None:
    served = strict_client.get("/v1/models").json()["data"][0]["id"]
    body = {"model": served, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    reply = strict_client.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == served
