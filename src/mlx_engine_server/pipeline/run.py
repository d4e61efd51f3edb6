"""One way to start a generation, whatever the protocol: every choice's sampling parameters,
admission to the engine before the response's first byte, and the headers every answer carries.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..chat.output import OutputRules
from ..chat.overflow import Compaction
from ..engine import Generation, VisionPrompt
from ..protocols.openai.types import ChatCompletionRequest, CompletionRequest
from .admission import admit
from .context import RequestContext
from .prepare import check_choice_count, plan_request, sampling_params

COMPACTION_HEADER = "x-context-compacted"
CACHED_TOKENS_HEADER = "x-mlx-cached-tokens"


@dataclass(frozen=True)
class Run:
    """An admitted generation: `choices` sequences in all, `n` for each prompt."""

    generation: Generation
    prompt_tokens: int  # all prompts, each once
    cached_tokens: int  # of those, found in the prefix cache
    model_id: str
    shutdown_grace_s: float
    compaction: Compaction | None
    choices: int = 1
    n: int = 1

    def headers(self) -> dict[str, str]:
        """What the response reports besides its body: cached prompt tokens, compaction."""
        headers = {CACHED_TOKENS_HEADER: str(self.cached_tokens)}
        if self.compaction is not None:
            headers[COMPACTION_HEADER] = self.compaction.header_value()
        return headers


@dataclass(frozen=True)
class ChatRun(Run):
    """A chat generation, with the rules that split its text (reasoning, content, tool calls)."""

    rules: OutputRules = field(default_factory=OutputRules)


async def start(
    ctx: RequestContext,
    body: ChatCompletionRequest | CompletionRequest,
    prompts: list[list[int]],
    *,
    grammar: str | None = None,
    vision: VisionPrompt | None = None,
    compaction: Compaction | None = None,
) -> Run:
    """Admit every choice of the request (`body.n` per prompt): a full engine is a 429 here.

    `grammar`: the constraint on every choice (a chat plan's, or a completion's response_format).
    """
    engine, options = ctx.engine, ctx.options
    check_choice_count(engine, options, body.n, len(prompts))
    choices = [
        (prompt, replace(params, seed=choice_seed(params.seed, index)))
        for prompt in prompts
        for params in [sampling_params(engine, options, body, prompt, grammar)]
        for index in range(body.n)
    ]
    generation = engine.generate(choices, ctx.timing, vision)
    cached = _cached_tokens(await admit(generation, ctx.receive), body.n)
    prompt_tokens = sum(len(prompt) for prompt in prompts)
    if ctx.notes is not None:  # the request's log line reports its tokens and time to first token
        ctx.notes.note_generation(prompt_tokens, cached, generation)
    model = engine.model.model_id
    grace_s = engine.options.shutdown_grace_s
    return Run(generation, prompt_tokens, cached, model, grace_s, compaction, len(choices), body.n)


async def start_chat(ctx: RequestContext, body: ChatCompletionRequest) -> ChatRun:
    """Plan one chat request (template, tools, overflow policy, images), then start it."""
    planned = await plan_request(ctx, body)
    run = await start(
        ctx,
        body,
        [planned.prompt_tokens],
        grammar=planned.plan.grammar,
        vision=planned.vision,
        compaction=planned.compaction,
    )
    return ChatRun(**vars(run), rules=planned.plan.rules)


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice i of a seeded request samples with seed + i: reproducible, and choice 0 is n=1."""
    return None if seed is None else seed + index


def _cached_tokens(admitted: dict[int, int], n: int) -> int:
    """As usage counts them: each prompt once (its first choice), not once per choice."""
    return sum(cached for index, cached in admitted.items() if index % n == 0)
