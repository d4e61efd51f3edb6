"""Anthropic Messages → the chat request every route runs on (ChatCompletionRequest's fields).

Blocks become the messages chat templates know: `tool_use` blocks become an assistant's
`tool_calls`, `tool_result` blocks become `tool` messages, `thinking` blocks become the
assistant's `reasoning_content`. Checks Anthropic makes on the conversation (a `tool_result`
answers a `tool_use` of the message before) are made here, so errors name Anthropic's fields.
"""

from __future__ import annotations

import json
from typing import Any

from ...errors import InvalidRequestError
from .types import (
    ContentBlock,
    CountTokensRequest,
    DocumentBlock,
    ImageBlock,
    Message,
    MessagesRequest,
    RedactedThinkingBlock,
    TextBlock,
    ThinkingBlock,
    ToolChoice,
    ToolResultBlock,
    ToolUseBlock,
)

TEXT_JOIN = "\n"  # between the text blocks of one message
EFFORT_FOR_TEMPLATE = {"max": "xhigh"}


def chat_fields(body: CountTokensRequest) -> dict[str, Any]:
    """The chat request's fields for the conversation (what count_tokens measures)."""
    fields: dict[str, Any] = {
        "model": body.model,
        "messages": [*_system_messages(body.system), *conversation(body.messages)],
    }
    if body.tools:
        fields["tools"] = [
            _tool(tool.name, tool.description, tool.input_schema) for tool in body.tools
        ]
    if body.tool_choice is not None:
        fields.update(_tool_choice(body.tool_choice, offered=bool(body.tools)))
    fields.update(_reasoning_fields(body))
    json_format = body.json_format()
    if json_format is not None:
        fields["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": json_format.schema_},
        }
    return fields


def generation_fields(body: MessagesRequest) -> dict[str, Any]:
    """All of the chat request's fields, sampling included."""
    fields = chat_fields(body)
    fields["max_tokens"] = body.max_tokens
    if body.stop_sequences:
        fields["stop"] = list(body.stop_sequences)
    for name in ("temperature", "top_p", "top_k"):
        value = getattr(body, name)
        if value is not None:
            fields[name] = value
    return fields


def _system_messages(system: str | list[TextBlock] | None) -> list[dict[str, Any]]:
    if system is None:
        return []
    text = system if isinstance(system, str) else TEXT_JOIN.join(block.text for block in system)
    return [{"role": "system", "content": text}] if text else []


def _tool(name: str, description: str | None, schema: dict[str, Any] | None) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name, "parameters": schema or {"type": "object"}}
    if description is not None:
        function["description"] = description
    return {"type": "function", "function": function}


def _tool_choice(choice: ToolChoice, *, offered: bool) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if choice.type == "tool":
        fields["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    else:
        fields["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    if offered and choice.type != "none":
        fields["parallel_tool_calls"] = not choice.disable_parallel_tool_use
    return fields


def _reasoning_fields(body: CountTokensRequest) -> dict[str, Any]:
    """`thinking` reaches the template as enable_thinking (Qwen3's, DeepSeek's name)."""
    fields: dict[str, Any] = {}
    if body.thinking is not None:
        enabled = body.thinking.type != "disabled"
        fields["chat_template_kwargs"] = {"enable_thinking": enabled}
    effort = body.output_config.effort if body.output_config is not None else None
    if effort is not None:
        fields["reasoning_effort"] = EFFORT_FOR_TEMPLATE.get(effort, effort)
    return fields


def conversation(messages: list[Message]) -> list[dict[str, Any]]:
    """The chat messages of an Anthropic conversation, checked the way Anthropic checks it."""
    if messages[-1].role == "assistant":
        raise InvalidRequestError(
            f"messages[{len(messages) - 1}]: a final assistant message (prefill) is not "
            "supported by this server; end the conversation with a user message.",
            param=f"messages[{len(messages) - 1}]",
        )
    chat: list[dict[str, Any]] = []
    open_calls: set[str] = set()
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        blocks = _blocks(message)
        if message.role == "assistant":
            reply = _assistant_message(blocks, where)
            open_calls = {call["id"] for call in reply.get("tool_calls", ())}
            chat.append(reply)
        else:
            chat.extend(_user_messages(blocks, where, open_calls))
            open_calls = set()
    return chat


def _blocks(message: Message) -> list[ContentBlock]:
    if isinstance(message.content, str):
        return [TextBlock(type="text", text=message.content)]
    return list(message.content)


def _assistant_message(blocks: list[ContentBlock], where: str) -> dict[str, Any]:
    texts: list[str] = []
    thinking: list[str] = []
    calls: list[dict[str, Any]] = []
    for position, block in enumerate(blocks):
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ThinkingBlock):
            thinking.append(block.thinking)
        elif isinstance(block, ToolUseBlock):
            arguments = json.dumps(block.input, ensure_ascii=False)
            function = {"name": block.name, "arguments": arguments}
            calls.append({"id": block.id, "type": "function", "function": function})
        elif not isinstance(block, RedactedThinkingBlock):
            raise _misplaced(block, f"{where}.content[{position}]", "user")
    message: dict[str, Any] = {"role": "assistant", "content": TEXT_JOIN.join(texts)}
    if thinking:
        message["reasoning_content"] = TEXT_JOIN.join(thinking)
    if calls:
        message["tool_calls"] = calls
        message["content"] = message["content"] or None
    return message


def _user_messages(
    blocks: list[ContentBlock], where: str, open_calls: set[str]
) -> list[dict[str, Any]]:
    """Tool results first (as `tool` messages), then the user's own text."""
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for position, block in enumerate(blocks):
        at = f"{where}.content[{position}]"
        if isinstance(block, ToolResultBlock):
            if parts:
                raise InvalidRequestError(
                    f"{at}: tool_result blocks must come before any other content of the message.",
                    param=at,
                )
            results.append(_tool_message(block, at, open_calls))
        elif isinstance(block, TextBlock):
            parts.append({"type": "text", "text": block.text})
        elif isinstance(block, ImageBlock):
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block, at)}})
        elif isinstance(block, DocumentBlock):
            raise unsupported_media(block, at)
        else:
            raise _misplaced(block, at, "assistant")
    if parts or not results:
        results.append({"role": "user", "content": _user_content(parts)})
    return results


def _user_content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Text alone stays one string; with images, the parts in order (the chat's image path)."""
    if all(part["type"] == "text" for part in parts):
        return TEXT_JOIN.join(part["text"] for part in parts)
    return parts


def _image_url(block: ImageBlock, at: str) -> str:
    """Anthropic's image sources as the URL an OpenAI image part carries; the media policy (files,
    remote fetching, size and format limits) then applies to it as to any chat image."""
    source = block.source
    kind = source.get("type")
    if kind == "base64" and isinstance(source.get("data"), str):
        media_type = source.get("media_type")
        if not isinstance(media_type, str) or not media_type.startswith("image/"):
            raise InvalidRequestError(
                f"{at}.source.media_type: expected an image type such as image/png.",
                param=f"{at}.source.media_type",
            )
        return f"data:{media_type};base64,{source['data']}"
    if kind == "url" and isinstance(source.get("url"), str):
        return str(source["url"])
    raise InvalidRequestError(
        f"{at}.source: expected {{'type': 'base64', 'media_type', 'data'}} or "
        "{'type': 'url', 'url'}; file ids are not supported.",
        param=f"{at}.source",
    )


def _tool_message(block: ToolResultBlock, at: str, open_calls: set[str]) -> dict[str, Any]:
    if block.tool_use_id not in open_calls:
        raise InvalidRequestError(
            f"{at}.tool_use_id: no tool_use block with id {block.tool_use_id!r} in the "
            "assistant message just before; each tool_result must answer one.",
            param=f"{at}.tool_use_id",
        )
    if isinstance(block.content, str):
        text = block.content
    else:
        parts = []
        for position, part in enumerate(block.content):
            if not isinstance(part, TextBlock):
                raise unsupported_media(part, f"{at}.content[{position}]")
            parts.append(part.text)
        text = TEXT_JOIN.join(parts)
    if block.is_error:
        text = f"Error: {text}"
    return {"role": "tool", "tool_call_id": block.tool_use_id, "content": text}


def unsupported_media(block: ImageBlock | DocumentBlock, at: str) -> InvalidRequestError:
    """Documents, and images where only text may go (tool results)."""
    where = "in tool results" if block.type == "image" else "by this server"
    return InvalidRequestError(f"{at}: {block.type} blocks are not supported {where}.", param=at)


def _misplaced(block: ContentBlock, at: str, belongs_to: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"{at}: a {block.type} block belongs in a {belongs_to} message.", param=at
    )
