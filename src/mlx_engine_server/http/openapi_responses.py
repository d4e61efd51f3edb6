"""The response shapes /openapi.json describes, mirroring what the routes build (tests check them
against real responses). They stay open to extra fields: newer OpenAI fields may be added to
answers."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class OpenModel(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(OpenModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(OpenModel):
    error: ErrorDetail


class PromptTokensDetails(OpenModel):
    cached_tokens: int


class UsageBody(OpenModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(OpenModel):
    role: Literal["assistant"]
    content: str | None


class ChatChoice(OpenModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: Any = None


class ChatCompletion(OpenModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageBody


class TextChoice(OpenModel):
    index: int
    text: str
    finish_reason: str
    logprobs: Any = None


class Completion(OpenModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: UsageBody


class ModelCard(OpenModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    context_window: int
    kind: str


class ModelList(OpenModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(OpenModel):
    status: Literal["ok", "unavailable"]
    model: str | None = None
    reason: str | None = None


class TokenizeResult(OpenModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResult(OpenModel):
    prompt: str


class Status(OpenModel):
    model: dict[str, Any]
    device: dict[str, Any]
    engine: dict[str, Any]
    counters: dict[str, Any]
    latency: dict[str, Any]
    uptime_s: float
    version: dict[str, Any]


class AnthropicErrorDetail(OpenModel):
    type: str
    message: str


class AnthropicErrorBody(OpenModel):
    type: Literal["error"]
    error: AnthropicErrorDetail


class AnthropicMessage(OpenModel):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[dict[str, Any]]
    stop_reason: str | None
    stop_sequence: str | None
    usage: dict[str, Any]


class TokenCount(OpenModel):
    input_tokens: int


class ResponseObject(OpenModel):
    id: str
    object: Literal["response"]
    created_at: int
    status: str
    model: str
    output: list[dict[str, Any]]
    usage: dict[str, Any] | None


class Deleted(OpenModel):
    id: str
    object: str
    deleted: bool


class StoredItem(OpenModel):
    id: str
    type: str


class ItemList(OpenModel):
    object: Literal["list"]
    data: list[StoredItem]
    first_id: str | None
    last_id: str | None
    has_more: bool


class ConversationObject(OpenModel):
    id: str
    object: Literal["conversation"]
    created_at: int
    metadata: dict[str, str]


class SessionObject(OpenModel):
    id: str
    object: Literal["session"]
    created_at: int
    messages: list[dict[str, Any]]


RESPONSE_MODELS: list[type[BaseModel]] = [
    Deleted,
    ItemList,
    ConversationObject,
    SessionObject,
    AnthropicErrorBody,
    AnthropicMessage,
    TokenCount,
    ResponseObject,
    ErrorBody,
    ChatCompletion,
    Completion,
    ModelCard,
    ModelList,
    Health,
    Status,
    TokenizeResult,
    DetokenizeResult,
]
