"""One chat request made ready for the engine: its prompt, how its output is split, and the
grammar that forces a tool call when the client demands one."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..protocols.openai.types import ChatCompletionRequest
from .output import OutputRules, ReasoningMarkers
from .parsers import ToolCallFormat, resolve_tool_call_format
from .prompt import chat_prompt
from .tool_grammar import ThinkingShape, check_tool_schemas, forced_format, tool_call_grammar
from .tools import (
    ToolPolicy,
    check_conversation,
    template_kwargs,
    template_messages,
    template_tools,
    tool_policy,
)

DEFAULT_THINKING = ReasoningMarkers("<think>", "</think>")
ReasoningParser = Literal["auto", "none"]


@dataclass(frozen=True)
class ChatFormats:
    """What this model's output looks like; worked out once when the app starts."""

    tools: ToolCallFormat | None
    thinking: ReasoningMarkers  # the tokenizer's own markers, else <think> … </think>
    split_reasoning: bool
    model_thinks: bool  # the tokenizer has thinking markers of its own
    special_ids: Mapping[str, int] = field(default_factory=dict)
    multimodal: bool = False  # a vision model: its template takes content as parts


@dataclass(frozen=True)
class ChatPlan:
    prompt_tokens: list[int]
    rules: OutputRules
    grammar: str | None
    prompt_text: str = ""  # as rendered: a vision model's processor expands its image markers


def chat_formats(
    tokenizer: Any, tool_call_parser: str, reasoning_parser: str, *, multimodal: bool = False
) -> ChatFormats:
    tools = resolve_tool_call_format(tool_call_parser, tokenizer)
    model_thinks = bool(getattr(tokenizer, "has_thinking", False))
    thinking = (
        ReasoningMarkers(tokenizer.think_start, tokenizer.think_end)
        if model_thinks
        else DEFAULT_THINKING
    )
    markers = {thinking.start, thinking.end, *(tools.starts if tools else ()), "[TOOL_CALLS]"}
    return ChatFormats(
        tools=tools,
        thinking=thinking,
        split_reasoning=reasoning_parser != "none",
        model_thinks=model_thinks,
        special_ids=_special_token_ids(tokenizer, markers),
        multimodal=multimodal,
    )


def plan_chat(tokenizer: Any, formats: ChatFormats, body: ChatCompletionRequest) -> ChatPlan:
    policy = tool_policy(body)
    check_conversation(list(body.messages))
    prompt = chat_prompt(
        tokenizer,
        template_messages(list(body.messages), multimodal=formats.multimodal),
        template_tools(body),
        template_kwargs(body),
    )
    opened = _opens_thinking(prompt.text, formats.thinking)
    output_format = formats.tools if policy.offered else None
    grammar = None
    if policy.forced:
        output_format = forced_format(formats.tools)
        grammar = _forcing_grammar(policy, output_format, formats, body, opened=opened)
    rules = OutputRules(
        reasoning=formats.thinking if formats.split_reasoning else None,
        starts_in_reasoning=opened,
        tools=output_format,
        offered=policy.offered_names,
        parallel=policy.parallel,
    )
    return ChatPlan(prompt.tokens, rules, grammar, prompt.text)


def _forcing_grammar(
    policy: ToolPolicy,
    output_format: ToolCallFormat,
    formats: ChatFormats,
    body: ChatCompletionRequest,
    *,
    opened: bool,
) -> str:
    indexes = {tool.function.name: index for index, tool in enumerate(body.tools or ())}
    check_tool_schemas(policy, indexes)
    thinking = None
    if opened or formats.model_thinks:
        thinking = ThinkingShape(formats.thinking.start, formats.thinking.end, opened=opened)
    return tool_call_grammar(
        policy, output_format.name, thinking=thinking, special_ids=formats.special_ids
    )


def _opens_thinking(prompt_text: str, thinking: ReasoningMarkers) -> bool:
    """The template ended the prompt inside a thinking block (as DeepSeek-R1's and Qwen3's do):
    generation starts in the middle of reasoning. The same test mlx-lm's server makes."""
    return prompt_text.rfind(thinking.start) > prompt_text.rfind(thinking.end)


def _special_token_ids(tokenizer: Any, markers: set[str]) -> dict[str, int]:
    """Markers that are one special token, which grammars must name by id, not as text."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return {
        str(token.content): int(token_id)
        for token_id, token in decoder.items()
        if getattr(token, "special", False) and str(token.content) in markers
    }
