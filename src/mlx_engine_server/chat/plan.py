"""One chat request made ready for the engine: its prompt, how its output is split, and the
grammar that constrains the answer: a forced tool call, a response_format's JSON, or (with tools
offered) a call or that other answer."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..protocols.openai.types import ChatCompletionRequest
from .output import OutputRules, ReasoningMarkers
from .parsers import ToolCallFormat, resolve_tool_call_format
from .parsers import generic as generic_format
from .prompt import chat_prompt
from .structured import response_format_rule
from .tool_fallback import TEXT_ANSWER, fallback_conversation, template_renders_tools
from .tool_grammar import ThinkingShape, check_tool_schemas, forced_format, tool_call_grammar
from .tools import (
    ToolPolicy,
    check_conversation,
    template_kwargs,
    template_messages,
    template_tools,
    tool_policy,
)

logger = logging.getLogger(__name__)

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
    tool_fallback: bool = False  # tools go into the system message (chat/tool_fallback.py)


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
    fallback = tool_call_parser == "generic" or (
        tool_call_parser == "auto" and not template_renders_tools(tokenizer)
    )
    if fallback:
        tools = generic_format.FORMAT
    _log_tool_format(tool_call_parser, tools, fallback=fallback)
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
        tool_fallback=fallback,
    )


def _log_tool_format(setting: str, tools: ToolCallFormat | None, *, fallback: bool) -> None:
    if fallback:
        logger.info("tool calls: the generic fallback (the chat template renders no tools)")
    elif tools is None:
        logger.info("tool calls: not parsed (--tool-call-parser %s)", setting)
    else:
        logger.info("tool calls: parsed as %s (--tool-call-parser %s)", tools.name, setting)


def plan_chat(tokenizer: Any, formats: ChatFormats, body: ChatCompletionRequest) -> ChatPlan:
    policy = tool_policy(body)
    check_conversation(list(body.messages))
    conversation = template_messages(list(body.messages), multimodal=formats.multimodal)
    tools = template_tools(body)
    if formats.tool_fallback:
        conversation, tools = fallback_conversation(conversation, body), None
    prompt = chat_prompt(tokenizer, conversation, tools, template_kwargs(body))
    opened = _opens_thinking(prompt.text, formats.thinking)
    output_format, grammar = _constraint(policy, formats, body, opened=opened)
    rules = OutputRules(
        reasoning=formats.thinking if formats.split_reasoning else None,
        starts_in_reasoning=opened,
        tools=output_format,
        offered=policy.offered_names,
        parallel=policy.parallel,
    )
    return ChatPlan(prompt.tokens, rules, grammar, prompt.text)


def _constraint(
    policy: ToolPolicy, formats: ChatFormats, body: ChatCompletionRequest, *, opened: bool
) -> tuple[ToolCallFormat | None, str | None]:
    """The format calls are parsed in, and the grammar of the answer.

    A forced call is all the answer holds: a response_format applies to a later turn (as at
    OpenAI). With calls allowed but not forced, a response_format's JSON or the fallback's plain
    text is the other answer the grammar allows.
    """
    answer = response_format_rule(body.response_format)  # checked even when a call is forced
    if policy.forced:
        answer = None
    elif not policy.offered or formats.tools is None:  # no call may be made, or none is read
        return formats.tools if policy.offered else None, _only(answer)
    elif answer is None and formats.tool_fallback:
        answer = TEXT_ANSWER
    elif answer is None:
        return formats.tools, None
    output_format = forced_format(formats.tools)
    grammar = _tool_grammar(policy, output_format, formats, body, opened=opened, answer=answer)
    return output_format, grammar


def _only(answer: str | None) -> str | None:
    return None if answer is None else f"start: {answer}"


def _tool_grammar(
    policy: ToolPolicy,
    output_format: ToolCallFormat,
    formats: ChatFormats,
    body: ChatCompletionRequest,
    *,
    opened: bool,
    answer: str | None,
) -> str:
    indexes = {tool.function.name: index for index, tool in enumerate(body.tools or ())}
    check_tool_schemas(policy, indexes)
    thinking = None
    if opened or formats.model_thinks:
        thinking = ThinkingShape(formats.thinking.start, formats.thinking.end, opened=opened)
    return tool_call_grammar(
        policy,
        output_format.name,
        thinking=thinking,
        special_ids=formats.special_ids,
        answer=answer,
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
