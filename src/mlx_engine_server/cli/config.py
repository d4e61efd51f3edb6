"""Settings: one frozen object, merged from CLI flags > MLX_SERVER_* env > JSON file > defaults.

Defaults live only here. Each setting has one name across the flag (`--max-queue`), the env var
(`MLX_SERVER_MAX_QUEUE`) and the JSON key (`"max_queue"`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    JsonConfigSettingsSource,
    NoDecode,
    SettingsConfigDict,
)

from ..protocols.openai.types import OverflowPolicy
from .keys import check_api_key, read_api_key_file
from .media_settings import MediaSettings
from .proxies import TrustedProxies
from .setting_values import split_list
from .settings_errors import SettingsError, describe_problems

KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)
LogLevel = Literal["critical", "error", "warning", "info", "debug"]
LogFormat = Literal["text", "json"]
GGUFRequantize = Literal["auto", "4", "8", "none"]
ModelDtype = Literal["auto", "float32", "bfloat16", "float16"]

# Several values: a repeated flag, a JSON list, or one comma-separated environment variable.
StrList = Annotated[list[str], NoDecode]
SecretList = Annotated[list[SecretStr], NoDecode]

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "mlx-engine-server"


class Settings(BaseSettings, MediaSettings):
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
    gguf_requantize: GGUFRequantize = Field(
        default="auto",
        description="GGUF tensors MLX cannot hold as they are (Q2_K, Q3_K, Q5_K, Q6_K, Q5_0, "
        "Q5_1, IQ types; Q4_0, Q4_1, Q8_0 and Q4_K are repacked exactly): re-quantize to MLX "
        "affine 4 or 8 bits, 'auto' (4 below 5 bits a weight, else 8), or keep as floats "
        "('none').",
    )
    dtype: ModelDtype = Field(
        default="auto",
        description="The dtype the model computes in, and so its KV cache's: 'auto' is float32 "
        "on the CPU (MLX's CPU kernels are far slower in 16 bits) and the model's own dtype on "
        "a GPU.",
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
    speculative: Literal["none", "ngram", "draft"] = Field(
        default="none",
        description="Speculative decoding: ngram drafts by prompt lookup, draft with "
        "--draft-model; drafts are verified in the batch.",
    )
    draft_model: str | None = Field(
        default=None,
        description="--speculative draft: a smaller model with the same tokenizer (directory, "
        "repo id in the local cache, or .gguf).",
    )
    num_draft_tokens: int = Field(
        default=5, ge=1, le=64, description="Most tokens a row drafts per step."
    )
    ngram_size: int = Field(
        default=3,
        ge=1,
        le=32,
        description="The longest run of tokens matched against the context to find a draft.",
    )
    ngram_min_size: int = Field(
        default=2,
        ge=1,
        le=32,
        description="The shortest run of tokens matched when no longer one is found.",
    )
    kv_bits: int | None = Field(
        default=None, description="Bits per value (4 or 8) of a quantized KV cache; None: not."
    )
    kv_group_size: int = Field(
        default=64, description="Values (32, 64 or 128) sharing one scale in a quantized cache."
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
        description="Tool-call format: auto (from the chat template; the generic fallback when "
        "it renders no tools), generic, none (refuse tools the template cannot render), hermes, "
        "llama3, mistral, gemma, or an mlx-lm parser name.",
    )
    reasoning_parser: Literal["auto", "none"] = Field(
        default="auto",
        description="auto: text in thinking markers goes to reasoning_content; none: to content.",
    )
    # --- security -----------------------------------------------------------------------------
    api_keys: SecretList = Field(
        default_factory=list,
        description="Keys accepted as `Authorization: Bearer KEY` (or `x-api-key`); none: no auth.",
    )
    api_key_file: Path | None = Field(
        default=None, description="A file with more API keys, one a line ('#' starts a comment)."
    )
    allowed_hosts: StrList = Field(
        default_factory=list,
        description="Host header names accepted besides localhost and loopback addresses.",
    )
    cors_origins: StrList = Field(
        default_factory=list, description="Origins a browser page may call from; none: CORS off."
    )
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    max_header_bytes: int = Field(default=32 * 1024, ge=1024, le=1024 * 1024)
    max_json_depth: int = Field(default=64, ge=4, le=512)
    header_timeout_s: float = Field(
        default=30.0, gt=0, le=3600, description="Time a client has to send a request's headers."
    )
    body_timeout_s: float = Field(
        default=60.0, gt=0, le=3600, description="Longest wait for the next piece of a body."
    )
    max_connections: int = Field(
        default=512, ge=1, le=1_000_000, description="Most client connections open at once."
    )
    max_messages: int = Field(default=2048, ge=1)
    max_stop_sequences: int = Field(default=16, ge=0)
    max_stop_chars: int = Field(default=256, ge=1)
    max_logit_bias: int = Field(default=1024, ge=0)
    # --- state: stored responses, conversations, sessions, rate limits ------------------------
    state_dir: Path | None = Field(
        default=None,
        description="Directory of the SQLite state file; default: <cache-dir>/state.",
    )
    state_url: str | None = Field(
        default=None,
        pattern=r"^rediss?://",
        description="A Redis URL (redis://host:port/db): state shared by several instances.",
    )
    state_retention_s: float = Field(
        default=30 * 24 * 3600.0,
        gt=0,
        description="How long stored responses and conversations live.",
    )
    state_max_records: int = Field(
        default=100_000, ge=1, description="Most stored records (SQLite); the oldest go first."
    )
    session_ttl_s: float = Field(
        default=24 * 3600.0,
        gt=0,
        description="A session is forgotten this long after its last turn.",
    )
    rate_limit_rpm: int | None = Field(
        default=None,
        ge=1,
        description="Requests per minute per API key (client address without keys).",
    )
    rate_limit_tpm: int | None = Field(
        default=None, ge=1, description="Tokens (prompt + completion) per minute per key."
    )
    # --- operations ---------------------------------------------------------------------------
    log_format: LogFormat = "text"
    log_prompts: bool = Field(default=False, description="Log prompt text (off: never logged).")
    root_path: str = Field(
        default="", pattern=r"^(/[^/\s]+)*$", description="Prefix a proxy mounts the server under."
    )
    forwarded_allow_ips: TrustedProxies = None  # cli/proxies.py: None trusts nobody
    # --- embedding in a desktop application ---------------------------------------------------
    ready_file: Path | None = Field(
        default=None, description="Where to write the ready line once requests are accepted."
    )
    uds: Path | None = Field(default=None, description="Serve on this Unix socket, not TCP.")
    parent_pid: int | None = Field(
        default=None, ge=1, description="Exit when the process with this id has ended."
    )
    exit_on_stdin_close: bool = Field(default=False, description="Exit when stdin closes.")
    quiet: bool = Field(
        default=False,
        description="Log warnings and errors only: no start-up lines, no progress bars.",
    )

    @field_validator("api_keys", "allowed_hosts", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        return split_list(value)

    @model_validator(mode="before")
    @classmethod
    def _draft_model_turns_draft_on(cls, data: Any) -> Any:
        """As mlx-lm's --draft-model: naming a draft model is enough."""
        if isinstance(data, dict) and data.get("draft_model") and "speculative" not in data:
            return {**data, "speculative": "draft"}
        return data

    @model_validator(mode="after")
    def _draft_model_with_draft_mode(self) -> Settings:
        if self.speculative == "draft" and self.draft_model is None:
            raise ValueError("--speculative draft needs --draft-model")
        if self.draft_model is not None and self.speculative != "draft":
            raise ValueError("--draft-model is used with --speculative draft only")
        return self

    @model_validator(mode="after")
    def _ngram_sizes_in_order(self) -> Settings:
        """A minimum left at its default follows a smaller --ngram-size down."""
        if "ngram_min_size" in self.model_fields_set and self.ngram_min_size > self.ngram_size:
            raise ValueError(
                f"--ngram-min-size {self.ngram_min_size} is larger than --ngram-size "
                f"{self.ngram_size}"
            )
        return self

    @field_validator("kv_bits", "kv_group_size", mode="after")
    @classmethod
    def _known_kv_sizes(cls, value: int | None, info: ValidationInfo) -> int | None:
        known = KV_BITS if info.field_name == "kv_bits" else KV_GROUP_SIZES
        if value is not None and value not in known:
            raise ValueError(f"must be one of {', '.join(map(str, known))}")
        return value

    @field_validator("api_keys", mode="after")
    @classmethod
    def _keys_are_tokens(cls, keys: list[SecretStr]) -> list[SecretStr]:
        for key in keys:
            check_api_key(key.get_secret_value())
        return keys

    @field_validator("api_key_file", mode="after")
    @classmethod
    def _key_file_readable(cls, path: Path | None) -> Path | None:
        if path is not None:
            read_api_key_file(path.expanduser())
            return path.expanduser()
        return path

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

    @field_validator("cache_dir", "state_dir", mode="after")
    @classmethod
    def _expand_home(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser()

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
        raise SettingsError(describe_problems(exc)) from None


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
