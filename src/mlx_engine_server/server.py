"""The Starlette app: routes validate, build a prompt, submit to the engine, shape the answer."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
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

from .api_models import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    OverflowPolicy,
    SamplingFields,
)
from .chat.output import OutputRules, split_whole
from .chat.overflow import (
    Compaction,
    CompactionCounters,
    Fitted,
    Limits,
    Summary,
    SummaryOptions,
    fit_conversation,
)
from .chat.parsers import known_tool_call_parsers
from .chat.plan import ChatFormats, ChatPlan, chat_formats, plan_chat
from .chat.prompt import chat_prompt_tokens, completion_prompt_tokens, resolve_max_tokens
from .chat.structured import response_format_grammar
from .config import Settings
from .engine import Engine, EngineOptions, Generation, SamplingParams, Usage
from .engine.group import EXIT_GROUP_FAILED, end_process, join_group
from .errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    ModelNotFoundError,
    StartupError,
)
from .http_errors import EXCEPTION_HANDLERS
from .http_io import read_model
from .metrics import RequestCounter, ServerMetrics
from .model_manager import ModelSource, Sharding, load_model
from .monitoring import health, metrics_text, status
from .responses import ChoiceResult, ResponseHeader, chat_completion, text_completion
from .sse import SHUTDOWN_MARGIN_S, ChatShape, ChunkShape, TextShape, collect, stream_response
from .tokenizer_routes import detokenize, tokenize

logger = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
COMPACTION_HEADER = "x-context-compacted"
FOLLOWER_MARGIN_S = 5.0


@dataclass(frozen=True)
class ServerOptions:
    """The part of Settings the HTTP layer needs, built once in serve()."""

    strict_model_name: bool = False
    max_tokens_default: int | None = None
    context_overflow: OverflowPolicy = "error"
    allow_request_overflow_policy: bool = False
    summary_keep_messages: int = 6
    summary_max_tokens: int = 512
    tool_call_parser: str = "auto"
    reasoning_parser: str = "auto"
    max_n: int = 8
    max_prompts: int = 16


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
    engine, options = _check_model(request, body.model)
    planner = ChatPlanner(engine, _chat_formats(request), body)
    fitted = await _fit_conversation(request, engine, options, body, planner.prompt_tokens)
    plan = planner.plan(fitted.messages)
    return await _generate(
        request,
        body,
        Prompts([plan.prompt_tokens]),
        chat_surface(plan.rules),
        compaction=fitted.compaction,
        grammar=plan.grammar,
    )


class ChatPlanner:
    """Prompts built exactly as the engine will see them (messages, tools, template arguments);
    the overflow policy measures with it, and its last plan is reused when nothing was dropped."""

    def __init__(self, engine: Engine, formats: ChatFormats, body: ChatCompletionRequest) -> None:
        self.tokenizer = engine.loaded.tokenizer
        self.formats = formats
        self.body = body
        self._last: tuple[list[ChatMessage], ChatPlan] | None = None

    def prompt_tokens(self, messages: list[ChatMessage]) -> list[int]:
        return self.plan(messages).prompt_tokens

    def plan(self, messages: list[ChatMessage]) -> ChatPlan:
        if self._last is not None and self._last[0] == messages:
            return self._last[1]
        body = self.body
        if messages != list(body.messages):
            body = body.model_copy(update={"messages": messages})
        plan = plan_chat(self.tokenizer, self.formats, body)
        self._last = (messages, plan)
        return plan


def _chat_formats(request: Request) -> ChatFormats:
    state = request.app.state
    if state.chat_formats is None:
        options: ServerOptions = state.options
        state.chat_formats = chat_formats(
            state.engine.loaded.tokenizer, options.tool_call_parser, options.reasoning_parser
        )
    formats: ChatFormats = state.chat_formats
    return formats


async def completions(request: Request) -> Response:
    body = await read_model(request, CompletionRequest)
    engine, options = _check_model(request, body.model)
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
    _check_choice_count(engine, options, body.n, len(prompts.tokens))
    grammar = _request_grammar(grammar, body)
    choices = [
        (prompt, replace(params, seed=_choice_seed(params.seed, index)))
        for prompt in prompts.tokens
        for params in [_sampling_params(engine, options, body, prompt, grammar)]
        for index in range(body.n)
    ]
    generation = Generation(engine, choices, request.app.state.metrics)
    head = ResponseHeader.new(surface.id_prefix, engine.loaded.model_id)
    with_logprobs = body.top_logprobs_count is not None
    echoes = _per_choice(prompts.echoes, body.n)
    summary = _summary_usage(compaction)
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


def _request_grammar(
    tool_grammar: str | None, body: ChatCompletionRequest | CompletionRequest
) -> str | None:
    """A forced tool call or a response_format: the two cannot both hold."""
    format_grammar = response_format_grammar(body.response_format)
    if tool_grammar is not None and format_grammar is not None:
        raise InvalidRequestError(
            "response_format cannot be combined with a tool_choice that forces a tool call",
            param="response_format",
        )
    return tool_grammar or format_grammar


async def _fit_conversation(
    request: Request,
    engine: Engine,
    options: ServerOptions,
    body: ChatCompletionRequest,
    render: Callable[[list[ChatMessage]], list[int]],
) -> Fitted:
    """Apply the context-overflow policy to the messages, and count what it did."""
    policy = _overflow_policy(options, body)
    window = engine.loaded.context_window
    requested = body.requested_max_tokens
    limits = Limits(window, requested or _answer_reserve(options, window), requested is not None)
    summary = SummaryOptions(
        options.summary_keep_messages, options.summary_max_tokens, EngineSummarizer(request)
    )
    counters: CompactionCounters = request.app.state.compactions
    try:
        fitted = await fit_conversation(list(body.messages), render, limits, policy, summary)
    except ContextLengthExceededError:
        counters.refusals += 1
        raise
    counters.record(fitted.compaction)
    return fitted


def _overflow_policy(options: ServerOptions, body: ChatCompletionRequest) -> OverflowPolicy:
    if body.context_overflow is None:
        return options.context_overflow
    if not options.allow_request_overflow_policy:
        raise InvalidRequestError(
            "context_overflow is not enabled on this server "
            "(the operator can allow it with --allow-request-overflow-policy)",
            param="context_overflow",
            code="unsupported_parameter",
        )
    return body.context_overflow


def _answer_reserve(options: ServerOptions, context_window: int) -> int:
    """Room compaction keeps for an answer when max_tokens is absent: not the last few tokens."""
    quarter = max(1, context_window // 4)
    default = options.max_tokens_default
    return quarter if default is None else min(default, quarter)


def _summary_usage(compaction: Compaction | None) -> Usage | None:
    if compaction is None or compaction.summary is None:
        return None
    summary = compaction.summary
    return Usage(summary.prompt_tokens, summary.completion_tokens, summary.cached_tokens)


class EngineSummarizer:
    """Summaries of old turns written by the served model: one more request to the same engine."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.engine: Engine = request.app.state.engine

    def prompt_tokens(self, messages: list[ChatMessage]) -> list[int]:
        return chat_prompt_tokens(self.engine.loaded.tokenizer, messages)

    async def summarize(self, prompt_tokens: list[int], max_tokens: int) -> Summary:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        generation = Generation(self.engine, [(prompt_tokens, params)])
        (result,), usage = await collect(generation, self.request.receive, 1, 1)
        return Summary(
            result.text, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens
        )


def _per_choice(per_prompt: list[str] | None, n: int) -> list[str] | None:
    return [text for text in per_prompt for _ in range(n)] if per_prompt is not None else None


def _choice_seed(seed: int | None, index: int) -> int | None:
    """Choice i of a seeded request samples with seed + i: reproducible, and choice 0 is n=1."""
    return None if seed is None else seed + index


def _check_choice_count(engine: Engine, options: ServerOptions, n: int, prompts: int) -> None:
    if n > options.max_n:
        raise InvalidRequestError(f"n may be at most {options.max_n} on this server", param="n")
    if n * prompts > engine.capacity:
        raise InvalidRequestError(
            f"{n * prompts} choices ({prompts} prompts x n={n}) exceed the {engine.capacity} "
            "sequences this server can hold at once",
            param="n",
        )


async def list_models(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    return JSONResponse({"object": "list", "data": [_model_card(engine)]})


async def get_model(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    model_id = request.path_params["model_id"]
    if model_id != engine.loaded.model_id:
        raise _model_not_found(model_id, engine.loaded.model_id)
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


def _check_model(request: Request, requested: str | None) -> tuple[Engine, ServerOptions]:
    """Any model name is accepted unless --strict-model-name: clients always send one."""
    engine: Engine = request.app.state.engine
    options: ServerOptions = request.app.state.options
    served = engine.loaded.model_id
    if options.strict_model_name and requested is not None and requested != served:
        raise _model_not_found(requested, served)
    return engine, options


def _model_not_found(requested: str, served: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"The model '{requested}' does not exist; this server serves '{served}'.", param="model"
    )


def _sampling_params(
    engine: Engine,
    options: ServerOptions,
    body: ChatCompletionRequest | CompletionRequest,
    prompt: list[int],
    grammar: str | None,
) -> SamplingParams:
    max_tokens = resolve_max_tokens(
        len(prompt),
        body.requested_max_tokens,
        options.max_tokens_default,
        engine.loaded.context_window,
    )
    temperature = 1.0 if body.temperature is None else body.temperature
    if body.top_p == 0.0:  # nothing but the single most likely token survives
        temperature = 0.0
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(0, body.top_k or 0),
        min_p=body.min_p or 0.0,
        seed=body.seed,
        repetition_penalty=body.repetition_penalty or 1.0,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=_token_bias(engine, body),
        stop=body.stop_list(),
        ignore_eos=body.ignore_eos,
        grammar=grammar,
        logprobs=body.top_logprobs_count,
    )


def _token_bias(engine: Engine, body: SamplingFields) -> tuple[tuple[int, float], ...]:
    if not body.logit_bias:
        return ()
    vocab_size = len(engine.loaded.tokenizer)
    bias = []
    for key, value in body.logit_bias.items():
        if not key.isdigit() or int(key) >= vocab_size:
            raise InvalidRequestError(
                f"logit_bias key {key!r} is not a token id of this model (0..{vocab_size - 1})",
                param="logit_bias",
            )
        bias.append((int(key), value))
    return tuple(bias)


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
    group = join_group(settings.distributed_mode, settings.distributed_timeout_s)
    sharding = Sharding(group.handle, group.info.mode) if group is not None else None
    engine = Engine(lambda: load_model(source, sharding), _engine_options(settings), group)
    loaded = engine.start()
    if group is not None and not group.info.leads:
        return follow_rank_zero(engine, settings.shutdown_grace_s)
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
    if engine.failure is not None:
        return EXIT_GROUP_FAILED
    return 0 if server.started else 1


def follow_rank_zero(engine: Engine, shutdown_grace_s: float) -> int:
    """Ranks 1..N-1 of a group serve no HTTP: they step rank 0's batches until it ends the group.

    A signal does not end a follower at once (launchers signal every rank, and rank 0 first
    drains its requests, which needs every rank); one that rank 0 does not follow with the end
    of the group within the grace period ends this process, and so the group.
    """
    signalled: list[float] = []
    previous = {
        sig: signal.signal(sig, lambda *_: signalled.append(time.monotonic()))
        for sig in HANDLED_SIGNALS
    }
    try:
        while not engine.wait(timeout_s=0.5):
            if signalled and time.monotonic() - signalled[0] > shutdown_grace_s + FOLLOWER_MARGIN_S:
                logger.error("rank 0 did not end the group after a signal; leaving it")
                end_process(after_s=0.0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


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
