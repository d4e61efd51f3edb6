"""OpenAI Responses → the chat request every route runs on (ChatCompletionRequest's fields).

`input` items become chat messages: `function_call` items join the assistant turn they belong to
as `tool_calls`, `function_call_output` items become `tool` messages, `reasoning` items become
the next assistant turn's `reasoning_content`. Errors name the Responses fields (`input[3]...`).
"""

from __future__ import annotations

import re
from typing import Any

from ...errors import APIError, InvalidRequestError
from .types import (
    ContentPart,
    FunctionCallItem,
    FunctionCallOutputItem,
    ImageContent,
    InputItem,
    MediaContent,
    MessageItem,
    ReasoningItem,
    ResponsesRequest,
    TextContent,
)

# Chat parameter names as the Responses request spells them, longest prefix first.
RESPONSES_PARAMS = (
    ("response_format.json_schema.schema", "text.format.schema"),
    ("response_format.json_schema", "text.format"),
    ("response_format", "text.format"),
    ("max_completion_tokens", "max_output_tokens"),
    ("max_tokens", "max_output_tokens"),
    ("reasoning_effort", "reasoning.effort"),
)


def chat_fields(body: ResponsesRequest) -> dict[str, Any]:
    fields: dict[str, Any] = {"messages": _messages(body)}
    if body.model is not None:
        fields["model"] = body.model
    if body.tools:
        fields["tools"] = [_tool(tool.model_dump(exclude_none=True)) for tool in body.tools]
    if body.tool_choice is not None:
        choice = body.tool_choice
        fields["tool_choice"] = (
            choice
            if isinstance(choice, str)
            else {"type": "function", "function": {"name": choice.name}}
        )
    optional = {
        "parallel_tool_calls": body.parallel_tool_calls,
        "max_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "reasoning_effort": body.reasoning.effort if body.reasoning else None,
        "response_format": _response_format(body),
    }
    fields.update({name: value for name, value in optional.items() if value is not None})
    if body.top_logprobs_count is not None:
        fields.update(logprobs=True, top_logprobs=body.top_logprobs_count)
    effort = body.reasoning.effort if body.reasoning else None
    if effort is not None:  # asking for an effort asks for thinking (Qwen3's enable_thinking)
        fields["chat_template_kwargs"] = {"enable_thinking": effort != "none"}
    return fields


def responses_param(error: APIError, body: ResponsesRequest) -> APIError:
    """An error raised on the chat request, naming the Responses parameter instead."""
    param = error.param
    if param is None or param.startswith("input"):
        return error
    if param.startswith("messages"):  # chat messages are not numbered as the input items are
        param = _input_param(param, body)
    param = param.replace(".function.parameters", ".parameters").replace(".function.", ".")
    for chat_name, responses_name in RESPONSES_PARAMS:
        if param.startswith(chat_name):
            param = responses_name + param[len(chat_name) :]
            break
    error.param = param
    return error


def _input_param(param: str, body: ResponsesRequest) -> str:
    """`messages[i]...` as the input item message i came from; its content parts keep their
    positions (`content[j]`), other details are dropped."""
    match = re.match(r"messages\[(\d+)\](\.content\[\d+\](\.image_url)?)?", param)
    origins = [origin for _, origin in _messages_with_origins(body)]
    if match is None or int(match.group(1)) >= len(origins):
        return "input"
    origin = origins[int(match.group(1))]
    detail = match.group(2) or ""
    return origin + detail if origin.startswith("input[") else origin


def _tool(tool: dict[str, Any]) -> dict[str, Any]:
    function = {key: value for key, value in tool.items() if key != "type"}
    return {"type": "function", "function": function}


def _response_format(body: ResponsesRequest) -> dict[str, Any] | None:
    text_format = body.text.format if body.text else None
    if text_format is None or text_format.type == "text":
        return None
    if text_format.type == "json_object":
        return {"type": "json_object"}
    spec = text_format.json_schema()
    return {"type": "json_schema", "json_schema": spec.model_dump(by_alias=True)}


def _messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    return [message for message, _ in _messages_with_origins(body)]


def _messages_with_origins(body: ResponsesRequest) -> list[tuple[dict[str, Any], str]]:
    """Chat messages, each with the request field it was made from."""
    messages: list[tuple[dict[str, Any], str]] = []
    if body.instructions:
        messages.append(({"role": "system", "content": body.instructions}, "instructions"))
    if isinstance(body.input, str):
        return [*messages, ({"role": "user", "content": body.input}, "input")]
    conversation = Conversation()
    conversation.read(body.input)
    return [*messages, *zip(conversation.messages, conversation.origins, strict=True)]


class Conversation:
    """Input items folded into chat messages, in order."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.origins: list[str] = []  # the input item each message comes from, for errors
        self._where = "input"
        self._calls: set[str] = set()  # ids of the calls the latest assistant turn made
        self._reasoning: list[str] = []  # for the next assistant turn

    def read(self, items: list[InputItem]) -> list[dict[str, Any]]:
        for index, item in enumerate(items):
            where = self._where = f"input[{index}]"
            if isinstance(item, MessageItem):
                self._message(item, where)
            elif isinstance(item, FunctionCallItem):
                self._function_call(item)
            elif isinstance(item, FunctionCallOutputItem):
                self._function_output(item, where)
            elif isinstance(item, ReasoningItem):
                self._reasoning.append(item.text())
        return self.messages

    def _message(self, item: MessageItem, where: str) -> None:
        if item.role == "assistant":
            self._assistant()["content"] = _text(item.content, f"{where}.content")
        else:
            self._end_reasoning_turn()
            content = _user_content(item.content, f"{where}.content")
            self._append({"role": item.role, "content": content})

    def _end_reasoning_turn(self) -> None:
        """Reasoning with nothing after it in its turn is an assistant turn of its own."""
        if self._reasoning:
            self._assistant()

    def _function_call(self, item: FunctionCallItem) -> None:
        turn = self._assistant(continuing=True)
        function = {"name": item.name, "arguments": item.arguments}
        turn.setdefault("tool_calls", []).append(
            {"id": item.call_id, "type": "function", "function": function}
        )
        if not turn["content"]:
            turn["content"] = None
        self._calls.add(item.call_id)

    def _function_output(self, item: FunctionCallOutputItem, where: str) -> None:
        if item.call_id not in self._calls:
            raise InvalidRequestError(
                f"No function_call with call_id {item.call_id!r} comes before this "
                "function_call_output in the latest assistant turn.",
                param=f"{where}.call_id",
            )
        output = _text(item.output, f"{where}.output")
        self._end_reasoning_turn()
        self._append({"role": "tool", "tool_call_id": item.call_id, "content": output})

    def _append(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        self.origins.append(self._where)

    def _assistant(self, *, continuing: bool = False) -> dict[str, Any]:
        """The assistant turn to add to: the last message when `continuing` one, else a new one."""
        last = self.messages[-1] if self.messages else None
        if continuing and last is not None and last["role"] == "assistant":
            return last
        turn: dict[str, Any] = {"role": "assistant", "content": ""}
        if self._reasoning:
            turn["reasoning_content"] = "\n".join(self._reasoning)
            self._reasoning = []
        self._append(turn)
        self._calls = set()
        return turn


def _user_content(content: str | list[ContentPart], where: str) -> str | list[dict[str, Any]]:
    """Text as one string; with images (a vision model's input), chat content parts in order."""
    if isinstance(content, str) or not any(isinstance(p, ImageContent) for p in content):
        return _text(content, where)
    parts: list[dict[str, Any]] = []
    for position, part in enumerate(content):
        if isinstance(part, ImageContent):
            parts.append(
                {"type": "image_url", "image_url": {"url": _image_url(part, where, position)}}
            )
        else:
            parts.append({"type": "text", "text": _text([part], where)})
    return parts


def _image_url(part: ImageContent, where: str, position: int) -> str:
    if part.image_url is None:
        raise InvalidRequestError(
            "input_image needs an image_url (http(s) or data: URL); file ids are not supported.",
            param=f"{where}[{position}].image_url",
        )
    return part.image_url


def _text(content: str | list[ContentPart], where: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for position, part in enumerate(content):
        if isinstance(part, ImageContent):
            raise InvalidRequestError(
                "input_image content goes only in user, system or developer messages.",
                param=f"{where}[{position}]",
            )
        if isinstance(part, MediaContent):
            raise InvalidRequestError(
                f"{part.type} content is not supported by this server.",
                param=f"{where}[{position}]",
            )
        texts.append(part.text if isinstance(part, TextContent) else part.refusal)
    return "".join(texts)
