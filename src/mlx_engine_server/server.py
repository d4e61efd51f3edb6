"""The Starlette app: routes validate, build a prompt, submit to the engine, shape the answer."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .api_models import ChatCompletionRequest, CompletionRequest
from .chat.output import OutputRules, split_whole
from .chat.overflow import Compaction, CompactionCounters
from .chat.parsers import known_tool_call_parsers
from .chat.prompt import completion_prompt_tokens
from .config import Settings
from .engine import Engine, EngineOptions, Generation, Usage
from .errors import InvalidRequestError, StartupError
from .http_errors import EXCEPTION_HANDLERS
from .http_io import read_model
from .metrics import RequestCounter, ServerMetrics
from .model_manager import ModelSource, load_model
from .monitoring import health, metrics_text, status
from .pipeline import (
    COMPACTION_HEADER,
    ServerOptions,
    check_choice_count,
    check_model,
    model_not_found,
    plan_request,
    request_grammar,
    sampling_params,
    summary_usage,
)
from .protocols import anthropic_routes, openai_responses_routes
from .responses import ChoiceResult, ResponseHeader, chat_completion, text_completion
from .sse import SHUTDOWN_MARGIN_S, ChatShape, ChunkShape, TextShape, collect, stream_response
from .tokenizer_routes import detokenize, tokenize

__all__ = ["ServerOptions", "create_app", "serve"]

logger = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def create_app(engine: Engine, options: ServerOptions | None = None) -> Starlette:
    """An app around an engine whose model is already loaded; the app stops the engine on exit."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        engine.stop()

    options = options or ServerOptions()
    compactions = CompactionCounters(options.context_overflow)
    metrics = ServerMetrics(engine, compactions)
    app = Starlette(
        middleware=[Middleware(RequestCounter, metrics=metrics)],
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/tokenize", tokenize, methods=["POST"]),
            Route("/detokenize", detokenize, methods=["POST"]),
            Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
            Route("/v1/mlx/status", status, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics_text, methods=["GET"]),
            *anthropic_routes.ROUTES,
            Route("/v1/responses", openai_responses_routes.responses, methods=["POST"]),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.options = options
    app.state.compactions = compactions
    app.state.chat_formats = None  # worked out from the model's tokenizer on first use
    return app


@dataclass(frozen=True)
class Surface:
    """What differs between chat and text completions once the prompts are tokens."""

    id_prefix: str
    stream_shape: Callable[[ResponseHeader, bool, bool, list[str] | None, Usage | None], ChunkShape]
    whole: Callable[[ResponseHeader, list[ChoiceResult], Usage, bool, list[str] | None], Any]


TEXT = Surface(
    "cmpl",
    lambda head, usage, logprobs, echoes, _: TextShape(head, usage, logprobs, echoes),
    lambda head, results, usage, logprobs, echoes: text_completion(
        head, results, usage, with_logprobs=logprobs, echoes=echoes
    ),
)


def chat_surface(rules: OutputRules) -> Surface:
    """Chat answers are split into reasoning, content and tool calls by this request's rules."""

    def shape(
        head: ResponseHeader,
        include_usage: bool,
        with_logprobs: bool,
        _echoes: list[str] | None,
        summary: Usage | None,
    ) -> ChunkShape:
        return ChatShape(head, include_usage, with_logprobs, rules, summary)

    def whole(
        head: ResponseHeader,
        results: list[ChoiceResult],
        usage: Usage,
        with_logprobs: bool,
        _echoes: list[str] | None,
    ) -> dict[str, Any]:
        outputs = [split_whole(rules, result.text) for result in results]
        return chat_completion(head, results, outputs, usage, with_logprobs=with_logprobs)

    return Surface("chatcmpl", shape, whole)


@dataclass(frozen=True)
class Prompts:
    """The request's prompts as tokens, and the text `echo` repeats before each choice."""

    tokens: list[list[int]]
    echoes: list[str] | None = None


async def chat_completions(request: Request) -> Response:
    body = await read_model(request, ChatCompletionRequest)
    plan, compaction = await plan_request(request, body)
    return await _generate(
        request,
        body,
        Prompts([plan.prompt_tokens]),
        chat_surface(plan.rules),
        compaction=compaction,
        grammar=plan.grammar,
    )


async def completions(request: Request) -> Response:
    body = await read_model(request, CompletionRequest)
    engine, options = check_model(request, body.model)
    given = body.prompts()
    if len(given) > options.max_prompts:
        raise InvalidRequestError(
            f"at most {options.max_prompts} prompts per request (got {len(given)})",
            param="prompt",
        )
    tokenizer = engine.loaded.tokenizer
    tokens = [
        completion_prompt_tokens(tokenizer, prompt, _prompt_param(given, index))
        for index, prompt in enumerate(given)
    ]
    echoes = [_echo_text(tokenizer, prompt) for prompt in given] if body.echo else None
    return await _generate(request, body, Prompts(tokens, echoes), TEXT)


def _prompt_param(given: list[str | list[int]], index: int) -> str:
    return f"prompt[{index}]" if len(given) > 1 else "prompt"


def _echo_text(tokenizer: Any, prompt: str | list[int]) -> str:
    return prompt if isinstance(prompt, str) else str(tokenizer.decode(prompt))


async def _generate(
    request: Request,
    body: ChatCompletionRequest | CompletionRequest,
    prompts: Prompts,
    surface: Surface,
    *,
    compaction: Compaction | None = None,
    grammar: str | None = None,
) -> Response:
    """Admit every choice of the request, then stream the answers or wait for all of them."""
    engine: Engine = request.app.state.engine
    options: ServerOptions = request.app.state.options
    check_choice_count(engine, options, body.n, len(prompts.tokens))
    grammar = request_grammar(grammar, body)
    choices = [
        (prompt, replace(params, seed=_choice_seed(params.seed, index)))
        for prompt in prompts.tokens
        for params in [sampling_params(engine, options, body, prompt, grammar)]
        for index in range(body.n)
    ]
    generation = Generation(engine, choices, request.app.state.metrics)
    head = ResponseHeader.new(surface.id_prefix, engine.loaded.model_id)
    with_logprobs = body.top_logprobs_count is not None
    echoes = _per_choice(prompts.echoes, body.n)
    summary = summary_usage(compaction)
    response: Response
    if body.stream:
        shape = surface.stream_shape(head, body.include_usage, with_logprobs, echoes, summary)
        response = stream_response(
            generation, shape, engine.options.shutdown_grace_s, len(choices), body.n
        )
    else:
        results, usage = await collect(generation, request.receive, len(choices), body.n)
        usage = usage.with_summary(summary)
        response = JSONResponse(surface.whole(head, results, usage, with_logprobs, echoes))
    if compaction is not None:
        response.headers[COMPACTION_HEADER] = compaction.header_value()
    return response


def _per_choice(per_prompt: list[str] | None, n: int) -> list[str] | None:
    return [text for text in per_prompt for _ in range(n)] if per_prompt is not None else None


def _choice_seed(seed: int | None, index: int) -> int | None:
    """Choice i of a seeded request samples with seed + i: reproducible, and choice 0 is n=1."""
    return None if seed is None else seed + index


async def list_models(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    return JSONResponse({"object": "list", "data": [_model_card(engine)]})


async def get_model(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    model_id = request.path_params["model_id"]
    if model_id != engine.loaded.model_id:
        raise model_not_found(model_id, engine.loaded.model_id)
    return JSONResponse(_model_card(engine))


def _model_card(engine: Engine) -> dict[str, Any]:
    loaded = engine.loaded
    return {
        "id": loaded.model_id,
        "object": "model",
        "created": loaded.created,
        "owned_by": "mlx-engine-server",
        "context_window": loaded.context_window,
        "kind": loaded.kind,
    }


def serve(settings: Settings) -> int:
    """Load the model, then serve until SIGINT/SIGTERM; the port opens once the model is ready."""
    source = ModelSource(
        model_path=settings.model_path,
        adapter_path=settings.adapter_path,
        model_id=settings.model_id,
        cache_dir=settings.cache_dir,
        trust_remote_code=settings.trust_remote_code,
    )
    if settings.tool_call_parser not in known_tool_call_parsers():
        raise StartupError(
            f"unknown --tool-call-parser {settings.tool_call_parser!r}; "
            f"choose one of {', '.join(known_tool_call_parsers())}"
        )
    engine = Engine(lambda: load_model(source), _engine_options(settings))
    loaded = engine.start()
    logger.info(
        "serving %s (%s, context window %d tokens) from %s",
        loaded.model_id,
        loaded.kind,
        loaded.context_window,
        loaded.model_path,
    )
    options = ServerOptions(
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
    )
    config = uvicorn.Config(
        create_app(engine, options),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s + SHUTDOWN_MARGIN_S * 2),
    )
    server = GracefulServer(config, engine)
    try:
        server.run()
    finally:
        engine.stop()
    return 0 if server.started else 1


class GracefulServer(uvicorn.Server):
    """uvicorn that drains the engine on SIGINT/SIGTERM and then exits 0.

    Running requests get the shutdown grace period to finish; the engine ends the rest with an
    error. uvicorn re-raises the captured signal once it has shut down, so the process would end
    "killed by SIGTERM" even though every request was answered and the model was released.
    """

    def __init__(self, config: uvicorn.Config, engine: Engine) -> None:
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.engine.drain()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _engine_options(settings: Settings) -> EngineOptions:
    return EngineOptions(
        max_batch_size=settings.max_batch_size,
        max_queue=settings.max_queue,
        prefill_step_size=settings.prefill_step_size,
        request_timeout_s=settings.request_timeout_s,
        prefix_cache_bytes=settings.prefix_cache_bytes,
        shutdown_grace_s=settings.shutdown_grace_s,
        memory_budget_bytes=settings.memory_budget_bytes,
    )
