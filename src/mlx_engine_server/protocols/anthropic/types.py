"""Anthropic Messages request types, with Anthropic's field names.

As on the OpenAI routes, unknown fields are ignored (clients such as Claude Code send beta fields)
and known ones are checked strictly; a field we cannot honour is a 400 naming it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from ..openai.types import (
    FUNCTION_NAME_PATTERN,
    MAX_TOOLS,
    WireModel,
    refuse_unless,
)

MAX_MESSAGES = 100_000  # Anthropic's own limit


class TextBlock(WireModel):
    type: Literal["text"]
    text: str


class ImageBlock(WireModel):
    type: Literal["image"]
    source: dict[str, Any]


class DocumentBlock(WireModel):
    type: Literal["document"]
    source: dict[str, Any]


class ToolUseBlock(WireModel):
    type: Literal["tool_use"]
    id: str = Field(min_length=1, max_length=256)
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    input: dict[str, Any]


ResultPart = Annotated[TextBlock | ImageBlock | DocumentBlock, Field(discriminator="type")]


class ToolResultBlock(WireModel):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1, max_length=256)
    content: str | list[ResultPart] = ""
    is_error: bool = False


class ThinkingBlock(WireModel):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None  # ours are empty; never checked


class RedactedThinkingBlock(WireModel):
    """Claude's encrypted reasoning: meaningless to any other model, so left out of the prompt."""

    type: Literal["redacted_thinking"]
    data: str


ContentBlock = Annotated[
    TextBlock
    | ImageBlock
    | DocumentBlock
    | ToolUseBlock
    | ToolResultBlock
    | ThinkingBlock
    | RedactedThinkingBlock,
    Field(discriminator="type"),
]


class Message(WireModel):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class Tool(WireModel):
    """A client tool; Anthropic's server tools (web search, code execution, ...) are refused."""

    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None
    strict: bool | None = None  # the schema is enforced whenever a call is forced

    @model_validator(mode="after")
    def _client_tool(self) -> Tool:
        refuse_unless(
            self.type in (None, "custom"),
            f"server tool {self.type!r} is not available on this server; "
            "only client tools (name, description, input_schema) are",
        )
        refuse_unless(self.input_schema is not None, "a tool needs an input_schema")
        return self


class ToolChoice(WireModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _name_with_tool(self) -> ToolChoice:
        refuse_unless(
            (self.type == "tool") == (self.name is not None),
            "tool_choice of type 'tool' needs a name (and only that type takes one)",
        )
        return self


class Thinking(WireModel):
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = Field(default=None, ge=1)  # accepted, not enforced
    display: Literal["summarized", "omitted"] | None = None


class OutputFormat(WireModel):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(WireModel):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: OutputFormat | None = None


class CountTokensRequest(WireModel):
    """The conversation part of a request: what /v1/messages/count_tokens measures."""

    model: str
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    output_format: OutputFormat | None = None  # the earlier (beta) name of output_config.format
    mcp_servers: list[Any] | None = None
    container: Any = None

    @model_validator(mode="after")
    def _no_remote_features(self) -> CountTokensRequest:
        refuse_unless(not self.mcp_servers, "mcp_servers are not supported by this server")
        refuse_unless(self.container is None, "containers are not supported by this server")
        return self

    def json_format(self) -> OutputFormat | None:
        if self.output_config is not None and self.output_config.format is not None:
            return self.output_config.format
        return self.output_format


# How many and how long: the server's stop limits (settings), checked once the request is a chat.
StopSequences = list[Annotated[str, Field(min_length=1)]]


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stop_sequences: StopSequences | None = None
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    metadata: dict[str, Any] | None = None  # user_id for abuse tracking: nothing to track here
    service_tier: Literal["auto", "standard_only"] | None = None  # one tier here
