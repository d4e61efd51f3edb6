"""What each part is told at start-up, built once from `Settings`: the app's `ServerOptions`
(with its media policy and request limits), the connection limits of uvicorn's h11, and the
engine's spec. Settings themselves go no further than cli/."""

from __future__ import annotations

from ..chat.media import MediaPolicy
from ..engine import EngineOptions
from ..engine.messages import EngineSpec
from ..http.app import ServerOptions
from ..http.connections import ConnectionLimits
from ..http.guards import HostPolicy, is_loopback_host
from ..protocols.openai.limits import RequestLimits
from .config import Settings
from .keys import read_api_key_file
from .state import rate_policy


def server_options(settings: Settings) -> ServerOptions:
    check_host = settings.uds is None and is_loopback_host(settings.host)
    allowed = frozenset(name.lower().rstrip(".") for name in settings.allowed_hosts)
    return ServerOptions(
        strict_model_name=settings.strict_model_name,
        max_tokens_default=settings.max_tokens_default,
        context_overflow=settings.context_overflow,
        allow_request_overflow_policy=settings.allow_request_overflow_policy,
        summary_keep_messages=settings.summary_keep_messages,
        summary_max_tokens=settings.summary_max_tokens,
        tool_call_parser=settings.tool_call_parser,
        reasoning_parser=settings.reasoning_parser,
        max_n=settings.max_n,
        max_prompts=settings.max_prompts,
        limits=RequestLimits(
            max_body_bytes=settings.max_body_bytes,
            max_json_depth=settings.max_json_depth,
            max_messages=settings.max_messages,
            max_stop_sequences=settings.max_stop_sequences,
            max_stop_chars=settings.max_stop_chars,
            max_logit_bias=settings.max_logit_bias,
        ),
        api_keys=api_keys(settings),
        host_policy=HostPolicy(allowed) if check_host or allowed else None,
        cors_origins=tuple(settings.cors_origins),
        log_prompts=settings.log_prompts,
        max_header_bytes=settings.max_header_bytes,
        media=media_policy(settings),
        rate_limits=rate_policy(settings),
        session_ttl_s=settings.session_ttl_s,
    )


def media_policy(settings: Settings) -> MediaPolicy:
    return MediaPolicy(
        allowed_dirs=tuple(settings.allowed_media_dir),
        allow_remote=settings.allow_remote_media,
        max_image_bytes=settings.max_image_bytes,
        max_image_pixels=settings.max_image_pixels,
        max_images=settings.max_images_per_request,
        formats=tuple(settings.image_formats),
        remote_timeout_s=settings.remote_media_timeout_s,
    )


def connection_limits(settings: Settings) -> ConnectionLimits:
    return ConnectionLimits(
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        max_connections=settings.max_connections,
        cors_origins=frozenset(settings.cors_origins),
    )


def engine_spec(settings: Settings) -> EngineSpec:
    return EngineSpec(
        model_path=settings.model_path,
        adapter_path=settings.adapter_path,
        model_id=settings.model_id,
        cache_dir=str(settings.cache_dir),
        trust_remote_code=settings.trust_remote_code,
        gguf_requantize=settings.gguf_requantize,
        dtype=settings.dtype,
        options=engine_options(settings),
    )


def engine_options(settings: Settings) -> EngineOptions:
    return EngineOptions(
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        prefill_step_size=settings.prefill_step_size,
        request_timeout_s=settings.request_timeout_s,
        prefix_cache_bytes=settings.prefix_cache_bytes,
        shutdown_grace_s=settings.shutdown_grace_s,
        memory_budget_bytes=settings.memory_budget_bytes,
        speculative=settings.speculative,
        num_draft_tokens=settings.num_draft_tokens,
        ngram_size=settings.ngram_size,
        ngram_min_size=settings.ngram_min_size,
        draft_model_path=settings.draft_model,
        kv_bits=settings.kv_bits,
        kv_group_size=settings.kv_group_size,
    )


def api_keys(settings: Settings) -> tuple[str, ...]:
    """Every accepted key: the ones given directly and the ones in the key file."""
    keys = [key.get_secret_value() for key in settings.api_keys]
    if settings.api_key_file is not None:
        keys += read_api_key_file(settings.api_key_file)
    return tuple(dict.fromkeys(keys))
