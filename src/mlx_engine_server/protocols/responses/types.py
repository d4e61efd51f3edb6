"""OpenAI Responses request types, with OpenAI's field names.

Unknown fields are ignored, as on the chat route; background runs, reusable prompts and tools
this server does not have are a 400 naming them. `store` (true unless false),
`previous_response_id` and `conversation` use the state store (state/).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from ..openai.types import (
    FUNCTION_NAME_PATTERN,
    MAX_TOOLS,
    MAX_TOP_LOGPROBS,
    JSONSchemaSpec,
    ReasoningEffort,
    WireModel,
    null_means,
    refuse_unless,
)

# Output this server can add on request: reasoning is never encrypted (there is no key), so
# asking for its encrypted form is honoured by the reasoning item's plain content.
OUTPUT_TEXT_LOGPROBS = "message.output_text.logprobs"
SUPPORTED_INCLUDES = frozenset({"reasoning.encrypted_content", OUTPUT_TEXT_LOGPROBS})
MAX_ID_CHARS = 256
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 64, 512


class Metadata(WireModel):
    """OpenAI's metadata limits, on a response as on a conversation: both are stored."""

    metadata: dict[str, str] | None = None

    @field_validator("metadata", mode="after")
    @classmethod
    def _openai_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        pairs = value or {}
        refuse_unless(len(pairs) <= MAX_METADATA_PAIRS, "at most 16 metadata pairs")
        refuse_unless(
            all(
                len(key) <= MAX_METADATA_KEY_CHARS and len(text) <= MAX_METADATA_VALUE_CHARS
                for key, text in pairs.items()
            ),
            "metadata keys have at most 64 characters, values at most 512",
        )
        return value


class TextContent(WireModel):
    type: Literal["input_text", "output_text"]
    text: str


class RefusalContent(WireModel):
    type: Literal["refusal"]
    refusal: str


class ImageContent(WireModel):
    """An image for a vision model, by URL (http(s), data: or file:, under the media policy)."""

    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = None
    detail: Literal["auto", "low", "high"] | None = None


class MediaContent(WireModel):
    """Files and audio: refused by this server."""

    type: Literal["input_file", "input_audio"]


ContentPart = Annotated[
    TextContent | RefusalContent | ImageContent | MediaContent, Field(discriminator="type")
]


class MessageItem(WireModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]


class FunctionCallItem(WireModel):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    arguments: str


class FunctionCallOutputItem(WireModel):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: str | list[ContentPart]


class ReasoningText(WireModel):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(WireModel):
    """Earlier reasoning, handed back to the template as the next assistant turn's reasoning."""

    type: Literal["reasoning"]
    summary: list[ReasoningText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None

    @field_validator("encrypted_content", mode="after")
    @classmethod
    def _no_encrypted(cls, value: str | None) -> str | None:
        refuse_unless(not value, "encrypted reasoning cannot be read by this server")
        return value

    def text(self) -> str:
        return "\n".join(part.text for part in self.content or self.summary)


def _item_type(value: Any) -> str:
    """Messages may leave `type` out (EasyInputMessage)."""
    if isinstance(value, dict):
        return str(value.get("type", "message"))
    return str(getattr(value, "type", "message"))


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type),
]


class FunctionTool(WireModel):
    type: str
    name: str | None = Field(default=None, pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("type", mode="after")
    @classmethod
    def _function_tools_only(cls, value: str) -> str:
        refuse_unless(
            value == "function",
            f"tool type {value!r} is not available on this server; only function tools are",
        )
        return value

    @model_validator(mode="after")
    def _named(self) -> FunctionTool:
        refuse_unless(self.name is not None, "a function tool needs a name")
        return self


class FunctionChoice(WireModel):
    type: Literal["function"]
    name: str


class TextFormat(WireModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    def json_schema(self) -> JSONSchemaSpec:
        return JSONSchemaSpec.model_validate(
            {
                "name": self.name or "output",
                "schema": self.schema_,
                "description": self.description,
                "strict": self.strict,
            }
        )


class TextConfig(WireModel):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None  # the default; the model's verbosity is fixed


class ReasoningConfig(WireModel):
    effort: ReasoningEffort | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None  # reasoning is sent whole
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(Metadata):
    model: str | None = None
    input: str | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None
    tools: list[FunctionTool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    stream: Annotated[bool, null_means(False)] = False
    stream_options: dict[str, Any] | None = None  # include_obfuscation: nothing to pad here
    include: list[str] | None = None
    # Accepted no-ops: identifiers for abuse tracking and cache routing; one tier. (metadata:
    # from Metadata, kept with the stored response.)
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    service_tier: Literal["auto", "default"] | None = None
    truncation: Literal["disabled"] | None = None  # "auto": see --context-overflow
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # Stored state: this response is kept unless store is false; earlier turns come from a
    # stored response or a conversation (not both).
    store: bool | None = None
    previous_response_id: str | None = Field(default=None, min_length=1, max_length=MAX_ID_CHARS)
    conversation: Any = None  # an id, or {"id": ...}: read by conversation_id
    # Refused: background runs, reusable prompts, tool-call caps.
    background: bool | None = None
    prompt: Any = None
    max_tool_calls: int | None = None

    @field_validator("background", mode="after")
    @classmethod
    def _not_true(cls, value: bool | None) -> bool | None:
        refuse_unless(not value, "background responses are not supported; leave it unset or false")
        return value

    @model_validator(mode="after")
    def _one_history(self) -> ResponsesRequest:
        refuse_unless(
            self.previous_response_id is None or self.conversation is None,
            "previous_response_id and conversation cannot both be given",
        )
        return self

    @property
    def top_logprobs_count(self) -> int | None:
        """None: no logprobs; else how many alternatives each token lists. Asking for
        alternatives asks for the logprobs too, rather than being silently ignored."""
        wanted = OUTPUT_TEXT_LOGPROBS in (self.include or ()) or bool(self.top_logprobs)
        return (self.top_logprobs or 0) if wanted else None

    @property
    def stored(self) -> bool:
        return self.store is not False

    @field_validator("conversation", mode="after")
    @classmethod
    def _conversation_id(cls, value: Any) -> Any:
        found = value.get("id") if isinstance(value, dict) else value
        refuse_unless(
            value is None or (isinstance(found, str) and 0 < len(found) <= MAX_ID_CHARS),
            'conversation is a conversation id, or an object {"id": ...}',
        )
        return found

    @property
    def conversation_id(self) -> str | None:
        return str(self.conversation) if self.conversation is not None else None

    @field_validator("prompt", "max_tool_calls", mode="after")
    @classmethod
    def _unsupported(cls, value: Any) -> Any:
        refuse_unless(value is None, "not supported by this server")
        return value

    @field_validator("include", mode="after")
    @classmethod
    def _known_includes(cls, value: list[str] | None) -> list[str] | None:
        unknown = sorted(set(value or ()) - SUPPORTED_INCLUDES)
        refuse_unless(not unknown, f"this server cannot include {', '.join(unknown)}")
        return value
