"""Prompt building: the model's own chat template, then a check against the context window.

Client data is data. A client who types a control token's text (`<|im_start|>`) into a message,
a tool call, a tool's description or schema gets the characters, never the control token: see
shield.py. The template's own markers stay special.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from ..errors import ContextLengthExceededError, InvalidRequestError
from .shield import DataShield, encode_segments, special_text


@dataclass(frozen=True)
class ChatPrompt:
    tokens: list[int]
    text: str  # as rendered, to see whether the template opened a thinking block


def chat_prompt(
    tokenizer: Any,
    conversation: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    kwargs: dict[str, Any] | None = None,
) -> ChatPrompt:
    """Render with the model's template (its own special tokens included), then tokenize."""
    template = getattr(tokenizer, "chat_template", None)
    if tools and "tools" not in str(template or ""):
        raise InvalidRequestError(
            "This model's chat template does not render tools, so the model cannot call them.",
            param="tools",
        )
    shield = DataShield(special_text(tuple(special_tokens(tokenizer))))
    conversation = shield.wrap(conversation)
    if template:
        text = _render_template(
            tokenizer, conversation, shield.wrap(tools), shield.wrap(kwargs or {})
        )
    else:
        text = _plain_transcript(conversation)
    if shield.used:
        segments = shield.segments(text)
        rendered = "".join(segment.text for segment in segments)
        return ChatPrompt(encode_segments(tokenizer, segments), rendered)
    tokens: list[int] = tokenizer.encode(text, add_special_tokens=False)
    return ChatPrompt(tokens, text)


def special_tokens(tokenizer: Any) -> list[str]:
    """The text of every special (control) token the tokenizer would match inside text."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None)
    if isinstance(decoder, dict):
        return [token.content for token in decoder.values() if getattr(token, "special", False)]
    return list(getattr(tokenizer, "all_special_tokens", []))


def completion_prompt_tokens(
    tokenizer: Any, prompt: str | list[int], param: str = "prompt"
) -> list[int]:
    if isinstance(prompt, list):
        check_token_ids(tokenizer, prompt, param)
        tokens = list(prompt)
    else:
        tokens = tokenizer.encode(prompt)
    return tokens or start_of_text(tokenizer, param)


def start_of_text(tokenizer: Any, param: str) -> list[int]:
    """What an empty prompt is completed from: OpenAI generates from the start of a text
    (`<|endoftext|>`). The tokenizer's beginning-of-sequence token, else its end-of-sequence
    token (GPT-2-style vocabularies put it between documents: after it a new text starts)."""
    for token_id in (_token_id(tokenizer, "bos_token_id"), _token_id(tokenizer, "eos_token_id")):
        if token_id is not None:
            return [token_id]
    raise InvalidRequestError(
        "This model's tokenizer has no beginning- or end-of-sequence token to start an empty "
        "prompt from; send at least one token.",
        param=param,
    )


def _token_id(tokenizer: Any, name: str) -> int | None:
    value = getattr(tokenizer, name, None)
    return value if isinstance(value, int) and 0 <= value < len(tokenizer) else None


def check_token_ids(tokenizer: Any, token_ids: list[int], param: str) -> None:
    """400 naming the first id outside the vocabulary (negative ids fail pydantic already)."""
    vocab_size = len(tokenizer)
    for index, token in enumerate(token_ids):
        if not 0 <= token < vocab_size:
            raise InvalidRequestError(
                f"{param}[{index}] = {token} is not a token id of this model (0..{vocab_size - 1})",
                param=f"{param}[{index}]",
            )


def _render_template(
    tokenizer: Any,
    conversation: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    kwargs: dict[str, Any],
) -> str:
    try:
        text = tokenizer.apply_chat_template(
            conversation, tools=tools, tokenize=False, add_generation_prompt=True, **kwargs
        )
    except (TemplateError, TypeError, ValueError) as exc:
        # A template raises (or trips over a value it cannot handle) on messages it refuses.
        raise InvalidRequestError(
            f"the model's chat template rejected these messages: {exc}", param="messages"
        ) from None
    return str(text)


def _plain_transcript(conversation: list[dict[str, Any]]) -> str:
    """For base models without a template: a plain transcript ending with the assistant's turn."""
    lines = [f"{entry['role']}: {entry['content']}" for entry in conversation]
    return "\n".join([*lines, "assistant:"])


def resolve_max_tokens(
    prompt_tokens: int, requested: int | None, default: int | None, context_window: int
) -> int:
    """The completion budget: what the client asked for, if prompt plus that fits the window."""
    room = context_window - prompt_tokens
    if requested is None:
        requested = min(default, room) if default is not None else room
        if requested < 1:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {context_window} tokens; "
                f"the prompt alone has {prompt_tokens} tokens.",
                param="messages",
            )
        return requested
    if requested > room:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {context_window} tokens. However, you "
            f"requested {prompt_tokens + requested} tokens ({prompt_tokens} in the prompt, "
            f"{requested} for the completion). Please reduce the prompt or max_tokens.",
            param="max_tokens",
        )
    return requested
