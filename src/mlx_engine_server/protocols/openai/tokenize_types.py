"""The bodies of /tokenize and /detokenize (vLLM's shapes)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, ValidationInfo, field_validator, model_validator

from .types import (
    MAX_TOOLS,
    ChatCompletionRequest,
    ChatMessage,
    ReasoningEffort,
    ToolChoice,
    ToolDefinition,
    WireModel,
    refuse_unless,
)


class TokenizeRequest(WireModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the model's template (and
    with the chat fields that change what it renders, as a chat request's prompt is)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    tools: list[ToolDefinition] | None = Field(default=None, min_length=1, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: ReasoningEffort | None = None
    add_special_tokens: bool = True
    return_token_strs: bool = False

    @field_validator("messages", mode="after")
    @classmethod
    def _prompt_or_messages(
        cls, value: list[ChatMessage] | None, info: ValidationInfo
    ) -> list[ChatMessage] | None:
        refuse_unless(
            (value is None) != (info.data.get("prompt") is None),
            "give either prompt or messages, not both",
        )
        return value

    @model_validator(mode="after")
    def _something_to_tokenize(self) -> TokenizeRequest:
        if self.prompt is None and self.messages is None:
            raise ValueError("give a prompt or messages to tokenize")
        return self

    def chat_request(self) -> ChatCompletionRequest:
        """The chat request whose prompt these messages make (only with `messages`)."""
        return ChatCompletionRequest(
            messages=self.messages or [],
            tools=self.tools,
            tool_choice=self.tool_choice,
            chat_template_kwargs=self.chat_template_kwargs,
            reasoning_effort=self.reasoning_effort,
        )


class DetokenizeRequest(WireModel):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]
