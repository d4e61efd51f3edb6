"""Settings: one frozen object, merged from CLI flags > MLX_SERVER_* env > JSON file > defaults.

Defaults live only here. Each setting has one name across the flag (`--max-queue`), the env var
(`MLX_SERVER_MAX_QUEUE`) and the JSON key (`"max_queue"`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    JsonConfigSettingsSource,
    SettingsConfigDict,
)

from .api_models import OverflowPolicy

LogLevel = Literal["critical", "error", "warning", "info", "debug"]

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "mlx-engine-server"


class SettingsError(Exception):
    """A setting is invalid; the message is one readable line per problem."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="MLX_SERVER_",
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    model_path: str | None = Field(
        default=None,
        description="Model directory (mlx-lm format), Hugging Face repo id or .gguf file; "
        "None serves the bundled SmolLM2-135M-Instruct.",
    )
    adapter_path: str | None = Field(default=None, description="LoRA adapter directory.")
    model_id: str | None = Field(
        default=None, description="Name reported by /v1/models; default: the path's last part."
    )
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: LogLevel = "info"
    strict_model_name: bool = Field(
        default=False, description="Answer 404 when a request names another model."
    )
    trust_remote_code: bool = False
    cache_dir: Path = Field(
        default=DEFAULT_CACHE_DIR, description="Where converted GGUF models are kept."
    )
    max_batch_size: int = Field(default=32, ge=1, le=1024)
    max_queue: int = Field(default=64, ge=0, le=100_000)
    prefill_step_size: int = Field(default=512, ge=16, le=65536)
    request_timeout_s: float = Field(default=600.0, gt=0)
    shutdown_grace_s: float = Field(
        default=10.0, ge=0, le=3600, description="On SIGTERM, time for running requests to finish."
    )
    memory_budget_bytes: int | None = Field(
        default=None,
        ge=1,
        description="Bytes the model, requests and prefix cache may use; None: MLX's memory limit.",
    )
    prefix_cache_bytes: int = Field(
        default=1 << 30, ge=0, description="Bytes of KV cache kept for reuse; 0 turns it off."
    )
    max_tokens_default: int | None = Field(
        default=None,
        ge=1,
        description="max_tokens when a request gives none; None: the rest of the context window.",
    )
    context_overflow: OverflowPolicy = Field(
        default="error",
        description="A conversation too long for the window: refuse, drop old turns, or "
        "summarize them with the model.",
    )
    allow_request_overflow_policy: bool = Field(
        default=False, description="Let a chat request choose its own context_overflow."
    )
    summary_keep_messages: int = Field(
        default=6, ge=0, le=10_000, description="Newest messages summarize keeps as they are."
    )
    summary_max_tokens: int = Field(
        default=512,
        ge=1,
        description="Longest summary in tokens (never more than a quarter of the window).",
    )

    tool_call_parser: str = Field(
        default="auto",
        pattern=r"^[a-z0-9_]+$",
        description="Tool-call format: auto (from the chat template), none, hermes, llama3, "
        "mistral, gemma, or an mlx-lm parser name.",
    )
    reasoning_parser: Literal["auto", "none"] = Field(
        default="auto",
        description="auto: text in thinking markers goes to reasoning_content; none: to content.",
    )

    max_n: int = Field(
        default=8, ge=1, le=128, description="Most choices (n) one request may ask for."
    )
    max_prompts: int = Field(
        default=16, ge=1, le=1024, description="Most prompts one /v1/completions request may hold."
    )

    distributed_mode: Literal["tensor", "pipeline"] = Field(
        default="tensor",
        description="Under mlx.launch: split the model by attention heads (tensor) or by layers "
        "(pipeline) over the processes.",
    )
    distributed_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="Under mlx.launch: a group step taking longer means a process is gone or "
        "stuck; the group then ends.",
    )

    @field_validator("cache_dir", mode="after")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("log_level", mode="before")
    @classmethod
    def _lowercase_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


def load_settings(cli_values: dict[str, Any], config_file: Path | None = None) -> Settings:
    """Merge the sources (CLI > env > JSON file > defaults) and validate once."""
    merged: dict[str, Any] = {}
    if config_file is not None:
        merged.update(_read_config_file(config_file))
    merged.update(EnvSettingsSource(Settings)())
    merged.update(cli_values)
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SettingsError(f"config file {path}: not found")
    try:
        parsed = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise SettingsError(f"config file {path}: not valid JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise SettingsError(f"config file {path}: must hold a JSON object")
    return JsonConfigSettingsSource(Settings, json_file=path)()


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"]) or "settings"
        if error["type"] == "extra_forbidden":
            problems.append(f"{name}: unknown setting")
        else:
            problems.append(f"{name}: {error['msg']} (got {error.get('input')!r})")
    return "invalid settings: " + "; ".join(problems)
