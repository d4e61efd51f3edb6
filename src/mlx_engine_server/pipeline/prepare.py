"""Preparing a request, whatever protocol it speaks: the model-name check, chat planning
(template, tools, reasoning), images, the context-overflow policy and sampling parameters.
OpenAI chat, Anthropic Messages and OpenAI Responses all run through here, then pipeline/run.py.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass

from ..chat.images import check_image_refs, image_refs, images_digest, images_of, load_images
from ..chat.media import LoadedImage
from ..chat.output import without_reasoning
from ..chat.overflow import (
    Compaction,
    Fitted,
    Limits,
    Render,
    Summary,
    SummaryOptions,
    fit_without_model,
    summarize,
)
from ..chat.plan import ChatFormats, ChatPlan, plan_chat
from ..chat.prompt import resolve_max_tokens
from ..engine import EngineClient, SamplingParams, Usage, VisionPrompt
from ..errors import ContextLengthExceededError, InvalidRequestError, ModelNotFoundError
from ..protocols.openai.limits import check_request_limits
from ..protocols.openai.types import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    OverflowPolicy,
    SamplingFields,
)
from .admission import collect
from .context import GenerationOptions, RequestContext
from .front_work import check_text_can_fit, off_loop, rendered_chars, tokens_at_least

# Thinking off, for templates with Qwen3's and DeepSeek's switch (mlx-lm renames it for
# templates that call it `thinking`); other templates ignore it.
SUMMARY_TEMPLATE_KWARGS = {"enable_thinking": False}
# Ten digits hold every vocabulary size; longer keys are refused before int() reads them.
TOKEN_ID_KEY = re.compile("[0-9]{1,10}")


class ChatPlanner:
    """Prompts built exactly as the engine will see them (messages, tools, template arguments);
    the overflow policy measures with it, and its last plan is reused when nothing was dropped."""

    def __init__(
        self, engine: EngineClient, formats: ChatFormats, body: ChatCompletionRequest
    ) -> None:
        self.tokenizer = engine.tokenizer
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


async def fit_conversation_for(
    ctx: RequestContext,
    body: ChatCompletionRequest,
    render: Callable[[list[ChatMessage]], list[int]],
) -> Fitted:
    """Apply the context-overflow policy to the messages, and count what it did."""
    engine, options = ctx.engine, ctx.options
    policy = _overflow_policy(options, body)
    window = engine.model.context_window
    requested = body.requested_max_tokens
    limits = Limits(window, requested or _answer_reserve(options, window), requested is not None)
    summary = SummaryOptions(
        options.summary_keep_messages, options.summary_max_tokens, EngineSummarizer(ctx)
    )
    counters = ctx.compactions
    messages = list(body.messages)
    if policy == "error":  # refused at once when the text alone surely overflows
        check_text_can_fit(engine.tokenizer, rendered_chars(messages), window, "messages")
    try:
        at_least = tokens_at_least(engine.tokenizer)
        fitted = await off_loop(fit_without_model, messages, render, limits, policy, at_least)
        if fitted is None:
            fitted = await off_loop(_summarized, messages, render, limits, summary)
    except ContextLengthExceededError:
        counters.refusals += 1
        raise
    counters.record(fitted.compaction)
    return fitted


def _summarized(
    messages: list[ChatMessage], render: Render, limits: Limits, summary: SummaryOptions
) -> Fitted:
    """The summarize policy in a front thread: its renders stay off the request's loop, and
    its one generation runs there (EngineSummarizer.summarize)."""
    return asyncio.run(summarize(messages, render, limits, summary))


def _overflow_policy(options: GenerationOptions, body: ChatCompletionRequest) -> OverflowPolicy:
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


def _answer_reserve(options: GenerationOptions, context_window: int) -> int:
    """Room compaction keeps for an answer when max_tokens is absent: not the last few tokens."""
    quarter = max(1, context_window // 4)
    default = options.max_tokens_default
    return quarter if default is None else min(default, quarter)


def summary_usage(compaction: Compaction | None) -> Usage | None:
    if compaction is None or compaction.summary is None:
        return None
    summary = compaction.summary
    return Usage(summary.prompt_tokens, summary.completion_tokens, summary.cached_tokens)


class EngineSummarizer:
    """Summaries of old turns written by the served model: one more request to the same engine."""

    def __init__(self, ctx: RequestContext) -> None:
        self.ctx = ctx
        self.engine = ctx.engine
        self.loop = asyncio.get_running_loop()  # the request's: its receive channel lives there
        self._last_plan: ChatPlan | None = None

    def prompt_tokens(self, messages: list[ChatMessage]) -> list[int]:
        """Rendered by the chat plan, as generation and /tokenize render the same messages, but
        with thinking off and without the request's chat_template_kwargs and reasoning_effort:
        those are for its answer, and reasoning would spend the summary's tokens and stand in
        its text (docs/long-conversations.md)."""
        body = ChatCompletionRequest(
            messages=messages, chat_template_kwargs=dict(SUMMARY_TEMPLATE_KWARGS)
        )
        self._last_plan = plan_chat(self.engine.tokenizer, self.ctx.chat_formats(), body)
        return self._last_plan.prompt_tokens

    async def summarize(self, prompt_tokens: list[int], max_tokens: int) -> Summary:
        """On the request's loop, whichever loop awaits this (compaction runs in a thread)."""
        job = self._summarize(prompt_tokens, max_tokens)
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(job, self.loop))

    async def _summarize(self, prompt_tokens: list[int], max_tokens: int) -> Summary:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        generation = self.engine.generate([(prompt_tokens, params)])
        (result,), usage = await collect(generation, self.ctx.receive, 1, 1)
        text = without_reasoning(
            result.text,
            self.ctx.chat_formats().thinking,
            starts_in_reasoning=self._starts_in_reasoning(prompt_tokens),
        )
        return Summary(text, usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)

    def _starts_in_reasoning(self, prompt_tokens: list[int]) -> bool:
        """Whether the template left the summary's prompt inside a thinking block (one that has
        no switch, as DeepSeek-R1's): summary_request's last render is the prompt it returns."""
        plan = self._last_plan
        return (
            plan is not None
            and plan.prompt_tokens == prompt_tokens
            and plan.rules.starts_in_reasoning
        )


def check_choice_count(
    engine: EngineClient, options: GenerationOptions, n: int, prompts: int
) -> None:
    if n > options.max_n:
        raise InvalidRequestError(f"n may be at most {options.max_n} on this server", param="n")
    if n * prompts > engine.capacity:
        raise InvalidRequestError(
            f"{n * prompts} choices ({prompts} prompts x n={n}) exceed the {engine.capacity} "
            "sequences this server can hold at once",
            param="n",
        )


def check_model(
    ctx: RequestContext, requested: str | None
) -> tuple[EngineClient, GenerationOptions]:
    """Any model name is accepted unless --strict-model-name: clients always send one."""
    engine, options = ctx.engine, ctx.options
    served = engine.model.model_id
    if options.strict_model_name and requested is not None and requested != served:
        raise model_not_found(requested, served)
    return engine, options


def model_not_found(requested: str, served: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"The model '{requested}' does not exist; this server serves '{served}'.", param="model"
    )


def sampling_params(
    engine: EngineClient,
    options: GenerationOptions,
    body: ChatCompletionRequest | CompletionRequest,
    prompt: list[int],
    grammar: str | None,
) -> SamplingParams:
    max_tokens = resolve_max_tokens(
        len(prompt),
        body.requested_max_tokens,
        options.max_tokens_default,
        engine.model.context_window,
    )
    temperature = 1.0 if body.temperature is None else body.temperature
    if body.top_p == 0.0:  # nothing but the single most likely token survives
        temperature = 0.0
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=_top_k(body.top_k, len(engine.tokenizer)),
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


def _top_k(requested: int | None, vocab_size: int) -> int:
    """0 (off) when absent, -1, or not smaller than the vocabulary: all tokens stay anyway."""
    if requested is None or requested <= 0 or requested >= vocab_size:
        return 0
    return requested


def note_prompt(ctx: RequestContext, prompt_text: Callable[[], str]) -> None:
    """The prompt's text reaches the log only with --log-prompts."""
    if ctx.notes is not None and ctx.options.log_prompts:
        ctx.notes.note_prompt(prompt_text())


def _token_bias(engine: EngineClient, body: SamplingFields) -> tuple[tuple[int, float], ...]:
    if not body.logit_bias:
        return ()
    vocab_size = len(engine.tokenizer)
    bias = []
    for key, value in body.logit_bias.items():
        token_id = token_id_key(key)
        if token_id is None or token_id >= vocab_size:
            raise InvalidRequestError(
                f"logit_bias key {key[:32]!r} is not a token id of this model "
                f"(a decimal number 0..{vocab_size - 1})",
                param="logit_bias",
            )
        bias.append((token_id, value))
    return tuple(bias)


def token_id_key(key: str) -> int | None:
    """A token id written as a JSON object key: ASCII digits only (`str.isdigit` also takes
    "²" and "٣", which `int` refuses or reads as another number); None for anything else."""
    if not TOKEN_ID_KEY.fullmatch(key):
        return None
    return int(key)


@dataclass(frozen=True)
class PlannedChat:
    """A chat request's prompt as the engine will see it, with its images when it has any."""

    plan: ChatPlan
    compaction: Compaction | None
    vision: VisionPrompt | None

    @property
    def prompt_tokens(self) -> list[int]:
        return list(self.vision.token_ids) if self.vision else self.plan.prompt_tokens


async def plan_request(ctx: RequestContext, body: ChatCompletionRequest) -> PlannedChat:
    """The prompt as the engine will see it, after the overflow policy had its say."""
    engine, options = ctx.engine, ctx.options
    check_request_limits(body, options.limits)
    check_model(ctx, body.model)
    note_prompt(ctx, lambda: "\n".join(message.text() for message in body.messages))
    messages = list(body.messages)
    refs = image_refs(messages)
    check_image_refs(refs, messages, engine.model.kind == "vision", options.media)
    images = await load_images(refs, options.media)
    planner = ChatPlanner(engine, ctx.chat_formats(), body)
    fitted = await fit_conversation_for(ctx, body, planner.prompt_tokens)
    plan = await off_loop(planner.plan, fitted.messages)
    vision = await _vision_prompt(engine, plan, images_of(fitted.messages, images))
    return PlannedChat(plan, fitted.compaction, vision)


async def _vision_prompt(
    engine: EngineClient, plan: ChatPlan, images: list[LoadedImage]
) -> VisionPrompt | None:
    """The prompt with its images through the model's processor; None without images."""
    if not images:
        return None
    pictures = [image.image for image in images]
    return await asyncio.to_thread(
        engine.vision_prompt, plan.prompt_text, pictures, images_digest(images)
    )


async def count_chat_tokens(ctx: RequestContext, body: ChatCompletionRequest) -> int:
    """The prompt tokens of a conversation as given (tools and template included), uncompacted."""
    check_model(ctx, body.model)
    engine = ctx.engine
    messages = list(body.messages)
    window = engine.model.context_window
    check_text_can_fit(engine.tokenizer, rendered_chars(messages), window, "messages")
    planner = ChatPlanner(engine, ctx.chat_formats(), body)
    return len(await off_loop(planner.prompt_tokens, messages))
