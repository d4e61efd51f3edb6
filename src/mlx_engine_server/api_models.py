"""Wire types with OpenAI's field names: requests validated strictly, responses built plainly.

Unknown request fields are ignored (clients send many); known fields are checked strictly, so a
string where a number belongs is a 400 naming the parameter, not a silent conversion.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
MAX_TOOLS = 128  # OpenAI's limit
FUNCTION_NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]

OverflowPolicy = Literal["error", "truncate", "summarize"]


class WireModel(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False, frozen=True)


class TextPart(WireModel):
    type: Literal["text"]
    text: str


class FunctionCall(WireModel):
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    arguments: str


class ToolCall(WireModel):
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(WireModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
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
        return "".join(part.text for part in self.content)


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


StopField = Annotated[
    str | list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]] | None,
    Field(max_length=MAX_STOP_SEQUENCES),
]


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
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        default=None, max_length=1024
    )
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Literal[False] | None = None
    ignore_eos: bool = False  # extension (vLLM's name): generate max_tokens, for benchmarks
    echo: Literal[False] | None = None

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

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

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[Annotated[int, Field(ge=0)]] | list[str] = Field(min_length=1)

    @field_validator("prompt", mode="after")
    @classmethod
    def _one_prompt(cls, prompt: str | list[int] | list[str]) -> str | list[int] | list[str]:
        if isinstance(prompt, list) and len(prompt) > 1 and isinstance(prompt[0], str):
            raise ValueError("only one prompt per request is supported")
        return prompt

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def prompt_text_or_ids(self) -> str | list[int]:
        prompt: Any = self.prompt
        if isinstance(prompt, list) and isinstance(prompt[0], str):
            return str(prompt[0])
        return prompt  # type: ignore[no-any-return]
