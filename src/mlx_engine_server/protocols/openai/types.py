"""Wire types with OpenAI's field names: requests validated strictly, responses built plainly.

Unknown request fields are ignored (clients send many); known fields are checked strictly, so a
string where a number belongs is a 400 naming the parameter, not a silent conversion.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

MAX_TOOLS = 128  # OpenAI's limit
FUNCTION_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]

OverflowPolicy = Literal["error", "truncate", "summarize"]
MAX_TOP_LOGPROBS = 20
MAX_N = 128  # the setting max_n is the real bound; this only keeps absurd values out early


class WireModel(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False, frozen=True)


def null_means(default: Any) -> BeforeValidator:
    """A field OpenAI types `... or null` whose default is not null: null means the default
    (clients that send unset fields as null, unlike the SDK, which leaves them out)."""
    return BeforeValidator(lambda value: default if value is None else value)


class TextPart(WireModel):
    type: Literal["text"]
    text: str


class ImageURL(WireModel):
    url: str = Field(min_length=1)
    # The model's processor decides the resolution: every detail is served the same way.
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(WireModel):
    type: Literal["image_url"]
    image_url: ImageURL


PART_CLASS_BY_TYPE = {"text": "TextPart", "image_url": "ImagePart"}


def _content_part_class(value: Any) -> str | None:
    """The part's class by its `type` (the class name keeps error locations free of the tag)."""
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return PART_CLASS_BY_TYPE.get(kind) if isinstance(kind, str) else None


ContentPart = Annotated[
    Annotated[TextPart, Tag("TextPart")] | Annotated[ImagePart, Tag("ImagePart")],
    Discriminator(
        _content_part_class,
        custom_error_type="invalid_content_part",
        custom_error_message=(
            "a content part must have type 'text' or 'image_url' (video_url, input_audio and "
            "file parts are not read: send a video as image_url frames)"
        ),
    ),
]


class FunctionCall(WireModel):
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    arguments: str


class ToolCall(WireModel):
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(WireModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    # Reasoning models' earlier thinking, under either name clients use; passed to the template.
    reasoning_content: str | None = None
    reasoning: str | None = None

    @model_validator(mode="after")
    def _content_needed(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))

    def image_parts(self) -> list[tuple[int, ImagePart]]:
        """(index in content, part) of every image of this message."""
        if not isinstance(self.content, list):
            return []
        return [(i, part) for i, part in enumerate(self.content) if isinstance(part, ImagePart)]


class FunctionDefinition(WireModel):
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(WireModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(WireModel):
    name: str


class NamedToolChoice(WireModel):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class StreamOptions(WireModel):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # a side-channel padding: nothing to pad here


class JSONSchemaSpec(WireModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # the schema is always enforced, strict or not


class ResponseFormat(WireModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaSpec | None = None


def refuse_unless(condition: bool, message: str) -> None:
    """A field we cannot honour: a 400 naming it, never a silent drop."""
    if not condition:
        raise ValueError(message)


# Their sizes are limits (settings), checked in limits.py.
StopField = str | list[str] | None


class SamplingFields(WireModel):
    """The parameters chat and text completions share."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: StopField = None
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    n: Annotated[int, null_means(1)] = Field(default=1, ge=1, le=MAX_N)
    stream: Annotated[bool, null_means(False)] = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    ignore_eos: bool = False  # extension (vLLM's name): generate max_tokens, for benchmarks
    user: str | None = None  # an end-user id for abuse tracking: accepted, nothing to track

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @field_validator("stream_options", mode="after")
    @classmethod
    def _stream_options_need_stream(
        cls, value: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        refuse_unless(
            value is None or info.data.get("stream") is True,
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
        )
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    context_overflow: OverflowPolicy | None = None  # extension, when the operator allows it
    tools: list[ToolDefinition] | None = Field(default=None, min_length=1, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: ReasoningEffort | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # Extension: the server keeps this conversation's history (protocols/openai/sessions.py).
    session_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._:-]{1,128}$")
    # Accepted no-ops (see tests/test_parameters.py for why each is safe to accept).
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    # Refused unless they ask for nothing.
    store: bool | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    verbosity: str | None = None
    moderation: dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: Any = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def top_logprobs_count(self) -> int | None:
        """None: no logprobs; else how many alternatives each token lists."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("top_logprobs", mode="after")
    @classmethod
    def _top_logprobs_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        refuse_unless(
            value is None or info.data.get("logprobs") is True,
            "top_logprobs needs logprobs set to true",
        )
        return value

    @field_validator("store", mode="after")
    @classmethod
    def _no_store(cls, value: bool | None) -> bool | None:
        refuse_unless(not value, "this server stores no completions; leave store unset or false")
        return value

    @field_validator("service_tier", mode="after")
    @classmethod
    def _one_tier(cls, value: str | None) -> str | None:
        refuse_unless(value in (None, "auto", "default"), "this server has one tier: auto")
        return value

    @field_validator("modalities", mode="after")
    @classmethod
    def _text_only(cls, value: list[str] | None) -> list[str] | None:
        refuse_unless(value is None or set(value) <= {"text"}, "only text output is supported")
        return value

    @field_validator("audio", "web_search_options", "moderation", mode="after")
    @classmethod
    def _unsupported_feature(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        refuse_unless(value is None, "not supported by this server")
        return value

    @field_validator("verbosity", mode="after")
    @classmethod
    def _no_verbosity(cls, value: str | None) -> str | None:
        refuse_unless(value is None, "not supported: the model's verbosity cannot be set")
        return value

    @field_validator("functions", "function_call", mode="after")
    @classmethod
    def _no_legacy_functions(cls, value: Any) -> Any:
        refuse_unless(value is None, "the deprecated functions API is not supported; use tools")
        return value


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
# One prompt of a list may be empty, like an empty string: completed from the start of a text.
MaybeEmptyTokenIds = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(SamplingFields):
    prompt: (
        str
        | TokenIds
        | Annotated[list[str], Field(min_length=1)]
        | Annotated[list[MaybeEmptyTokenIds], Field(min_length=1)]
    )
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: Annotated[bool, null_means(False)] = False
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    suffix: str | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def top_logprobs_count(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request: a string or a list of token ids."""
        prompt: Any = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt[0], int):
            return [list(prompt)]
        return list(prompt)

    @field_validator("best_of", mode="after")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        # best_of > n needs ranking candidates by likelihood: not done here, so not accepted.
        refuse_unless(value in (None, info.data.get("n")), "best_of other than n is not supported")
        return value

    @field_validator("echo", mode="after")
    @classmethod
    def _echo_without_logprobs(cls, value: bool, info: ValidationInfo) -> bool:
        refuse_unless(
            not (value and info.data.get("logprobs") is not None),
            "echo with logprobs (the prompt's logprobs) is not supported",
        )
        return value

    @field_validator("suffix", mode="after")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        refuse_unless(not value, "suffix (insertion) is not supported")
        return value
