"""The Starlette app: routes validate, build a prompt, submit to the engine, shape the answer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..chat.output import OutputRules, split_whole
from ..chat.overflow import Compaction, CompactionCounters
from ..chat.prompt import completion_prompt_tokens
from ..engine import EngineClient, Usage, VisionPrompt
from ..errors import InvalidRequestError
from ..pipeline.prepare import (
    CACHED_TOKENS_HEADER,
    COMPACTION_HEADER,
    ServerOptions,
    check_choice_count,
    check_model,
    model_not_found,
    note_generation,
    note_prompt,
    plan_request,
    request_grammar,
    sampling_params,
    summary_usage,
)
from ..protocols.anthropic import routes as anthropic_routes
from ..protocols.openai.limits import check_request_limits
from ..protocols.openai.render import ChoiceResult, ResponseHeader, chat_completion, text_completion
from ..protocols.openai.tokenize import detokenize, tokenize
from ..protocols.openai.types import ChatCompletionRequest, CompletionRequest
from ..protocols.responses import routes as openai_responses_routes
from .access_log import REQUEST_ID_HEADER, RequestLog
from .body import read_model, request_limits
from .errors import EXCEPTION_HANDLERS
from .guards import ApiKeyGuard, HeaderLimit, HostGuard
from .metrics import RequestCounter, ServerMetrics
from .openapi import openapi_json
from .ops import health, metrics_text, status
from .sse import ChatShape, ChunkShape, TextShape, admit, collect, stream_response

__all__ = ["ServerOptions", "create_app"]

# What a browser page may read of a cross-origin response besides the safelisted headers.
EXPOSED_HEADERS = (REQUEST_ID_HEADER, CACHED_TOKENS_HEADER, COMPACTION_HEADER, "retry-after")


def create_app(engine: EngineClient, options: ServerOptions | None = None) -> Starlette:
    """An app around an engine whose model is already loaded; the app stops the engine on exit."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        engine.stop()

    options = options or ServerOptions()
    compactions = CompactionCounters(options.context_overflow)
    metrics = ServerMetrics(engine, compactions)
    app = Starlette(
        middleware=_middleware(options, metrics),
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
            Route("/openapi.json", openapi_json, methods=["GET"]),
        ],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.options = options
    app.state.compactions = compactions
    app.state.chat_formats = None  # worked out from the model's tokenizer on first use
    app.state.limits = options.limits
    return app


def _middleware(options: ServerOptions, metrics: ServerMetrics) -> list[Middleware]:
    """Outermost first: log everything; then Host, CORS (preflights need no key), API key."""
    stack = [
        Middleware(RequestLog),
        Middleware(HeaderLimit, max_header_bytes=options.max_header_bytes),
    ]
    if options.host_policy is not None:
        stack.append(Middleware(HostGuard, policy=options.host_policy))
    if options.cors_origins:
        stack.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(options.cors_origins),
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["*"],
                allow_credentials=False,  # keys travel in a header, never as cookies
                expose_headers=list(EXPOSED_HEADERS),
                max_age=600,
            )
        )
    if options.api_keys:
        stack.append(Middleware(ApiKeyGuard, api_keys=options.api_keys))
    stack.append(Middleware(RequestCounter, metrics=metrics))
    return stack


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
    planned = await plan_request(request, body)
    return await _generate(
        request,
        body,
        Prompts([planned.prompt_tokens]),
        chat_surface(planned.plan.rules),
        compaction=planned.compaction,
        grammar=planned.plan.grammar,
        vision=planned.vision,
    )


async def completions(request: Request) -> Response:
    body = await read_model(request, CompletionRequest)
    check_request_limits(body, request_limits(request))
    engine, options = check_model(request, body.model)
    given = body.prompts()
    note_prompt(request, lambda: "\n".join(str(prompt) for prompt in given))
    if len(given) > options.max_prompts:
        raise InvalidRequestError(
            f"at most {options.max_prompts} prompts per request (got {len(given)})",
            param="prompt",
        )
    tokenizer = engine.tokenizer
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
    vision: VisionPrompt | None = None,
) -> Response:
    """Admit every choice of the request, then stream the answers or wait for all of them."""
    engine: EngineClient = request.app.state.engine
    options: ServerOptions = request.app.state.options
    check_choice_count(engine, options, body.n, len(prompts.tokens))
    grammar = request_grammar(grammar, body)
    choices = [
        (prompt, replace(params, seed=_choice_seed(params.seed, index)))
        for prompt in prompts.tokens
        for params in [sampling_params(engine, options, body, prompt, grammar)]
        for index in range(body.n)
    ]
    generation = engine.generate(choices, request.app.state.metrics, vision)
    cached_tokens = _cached_tokens(await admit(generation, request.receive), body.n)
    note_generation(
        request, sum(len(tokens) for tokens in prompts.tokens), cached_tokens, generation
    )
    head = ResponseHeader.new(surface.id_prefix, engine.model.model_id)
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
    response.headers[CACHED_TOKENS_HEADER] = str(cached_tokens)
    if compaction is not None:
        response.headers[COMPACTION_HEADER] = compaction.header_value()
    return response


def _cached_tokens(admitted: dict[int, int], n: int) -> int:
    """As usage counts them: each prompt once (its first choice), not once per choice."""
    return sum(cached for index, cached in admitted.items() if index % n == 0)


def _per_choice(per_prompt: list[str] | None, n: int) -> list[str] | None:
    return [text for text in per_prompt for _ in range(n)] if per_prompt is not None else None


def _choice_seed(seed: int | None, index: int) -> int | None:
    """Choice i of a seeded request samples with seed + i: reproducible, and choice 0 is n=1."""
    return None if seed is None else seed + index


async def list_models(request: Request) -> Response:
    engine: EngineClient = request.app.state.engine
    return JSONResponse({"object": "list", "data": [_model_card(engine)]})


async def get_model(request: Request) -> Response:
    engine: EngineClient = request.app.state.engine
    model_id = request.path_params["model_id"]
    if model_id != engine.model.model_id:
        raise model_not_found(model_id, engine.model.model_id)
    return JSONResponse(_model_card(engine))


def _model_card(engine: EngineClient) -> dict[str, Any]:
    loaded = engine.model
    return {
        "id": loaded.model_id,
        "object": "model",
        "created": loaded.created,
        "owned_by": "mlx-engine-server",
        "context_window": loaded.context_window,
        "kind": loaded.kind,
    }
