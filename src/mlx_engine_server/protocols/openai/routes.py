"""OpenAI's chat and text completions and the model list: validate, build the prompts, start
the generation through the shared pipeline, shape the answer as OpenAI does."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ...chat.output import OutputRules, split_whole
from ...chat.overflow import Compaction
from ...chat.prompt import completion_prompt_tokens
from ...chat.structured import response_format_grammar
from ...engine import EngineClient, Usage, VisionPrompt
from ...errors import InvalidRequestError
from ...http.body import read_model, request_limits
from ...http.context import ServerOptions, request_context
from ...http.guards import request_owner
from ...http.sse import GenerationStream
from ...pipeline.admission import ChoiceResult, collect
from ...pipeline.events import ChunkShape, openai_events
from ...pipeline.front_work import check_text_can_fit, off_loop
from ...pipeline.prepare import (
    check_model,
    model_not_found,
    note_prompt,
    plan_request,
    summary_usage,
)
from ...pipeline.run import start
from .limits import check_request_limits
from .render import ResponseHeader, chat_completion, text_completion
from .sessions import Session, SessionLocks, delete_session, read_session, reply_of
from .stream import ChatShape, TextShape
from .types import ChatCompletionRequest, CompletionRequest


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
        outputs = [
            split_whole(rules, result.text, cut_off=result.finish_reason == "length")
            for result in results
        ]
        return chat_completion(head, results, outputs, usage, with_logprobs=with_logprobs)

    return Surface("chatcmpl", shape, whole)


@dataclass(frozen=True)
class Prompts:
    """The request's prompts as tokens, and the text `echo` repeats before each choice."""

    tokens: list[list[int]]
    echoes: list[str] | None = None


async def chat_completions(request: Request) -> Response:
    body = await read_model(request, ChatCompletionRequest)
    options: ServerOptions = request.app.state.options
    owner = request_owner(request.scope)
    session = await Session.open(
        request.app.state.store,
        owner,
        body,
        options.session_ttl_s,
        options.limits.max_messages,
        locks=_session_locks(request),
    )
    if session is None:
        return await _chat(request, body)
    try:
        response = await _chat(request, session.continued(body), session)
    except BaseException:
        session.release()
        raise
    if not isinstance(response, GenerationStream):  # a stream lets go when it ends
        session.release()
    return response


async def _chat(
    request: Request, body: ChatCompletionRequest, session: Session | None = None
) -> Response:
    planned = await plan_request(request_context(request), body)
    return await _generate(
        request,
        body,
        Prompts([planned.prompt_tokens]),
        chat_surface(planned.plan.rules),
        compaction=planned.compaction,
        grammar=planned.plan.grammar,
        vision=planned.vision,
        session=session,
    )


def _session_locks(request: Request) -> SessionLocks:
    locks: SessionLocks | None = getattr(request.app.state, "session_locks", None)
    if locks is None:
        locks = request.app.state.session_locks = SessionLocks()
    return locks


async def get_session(request: Request) -> Response:
    owner = request_owner(request.scope)
    session_id = request.path_params["session_id"]
    return JSONResponse(await read_session(request.app.state.store, owner, session_id))


async def remove_session(request: Request) -> Response:
    owner = request_owner(request.scope)
    session_id = request.path_params["session_id"]
    return JSONResponse(await delete_session(request.app.state.store, owner, session_id))


def _prompt_tokens(tokenizer: Any, given: list[str | list[int]]) -> list[list[int]]:
    return [
        completion_prompt_tokens(tokenizer, prompt, _prompt_param(given, index))
        for index, prompt in enumerate(given)
    ]


async def completions(request: Request) -> Response:
    body = await read_model(request, CompletionRequest)
    check_request_limits(body, request_limits(request))
    ctx = request_context(request)
    engine, options = check_model(ctx, body.model)
    given = body.prompts()
    note_prompt(ctx, lambda: "\n".join(str(prompt) for prompt in given))
    if len(given) > options.max_prompts:
        raise InvalidRequestError(
            f"at most {options.max_prompts} prompts per request (got {len(given)})",
            param="prompt",
        )
    tokenizer = engine.tokenizer
    window = engine.model.context_window
    for index, prompt in enumerate(given):
        if isinstance(prompt, str):
            check_text_can_fit(tokenizer, len(prompt), window, _prompt_param(given, index))
    tokens = await off_loop(_prompt_tokens, tokenizer, given)
    echoes = [_echo_text(tokenizer, prompt) for prompt in given] if body.echo else None
    grammar = response_format_grammar(body.response_format)
    return await _generate(request, body, Prompts(tokens, echoes), TEXT, grammar=grammar)


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
    session: Session | None = None,
) -> Response:
    """Admit every choice of the request, then stream the answers or wait for all of them;
    a session's reply is saved before the answer ends."""
    ctx = request_context(request)
    run = await start(
        ctx, body, prompts.tokens, grammar=grammar, vision=vision, compaction=compaction
    )
    head = ResponseHeader.new(surface.id_prefix, run.model_id)
    with_logprobs = body.top_logprobs_count is not None
    echoes = _per_choice(prompts.echoes, body.n)
    summary = summary_usage(compaction)
    response: Response
    if body.stream:
        shape = surface.stream_shape(head, body.include_usage, with_logprobs, echoes, summary)
        events = openai_events(run.generation, shape, run.choices, run.n)
        on_close = None
        if session is not None and isinstance(body, ChatCompletionRequest):
            events = session.saved_after(events, body)
            on_close = session.release
        response = GenerationStream(run.generation, events, run.shutdown_grace_s, on_close=on_close)
    else:
        results, usage = await collect(run.generation, request.receive, run.choices, run.n)
        usage = usage.with_summary(summary)
        answer = surface.whole(head, results, usage, with_logprobs, echoes)
        if session is not None and isinstance(body, ChatCompletionRequest):
            await session.save(body, reply_of(answer))
        response = JSONResponse(answer)
    response.headers.update(run.headers())
    return response


def _per_choice(per_prompt: list[str] | None, n: int) -> list[str] | None:
    return [text for text in per_prompt for _ in range(n)] if per_prompt is not None else None


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
