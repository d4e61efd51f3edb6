"""Tools and reasoning in a chat request: the checks the wire types cannot make alone, and the
messages, tools and keyword arguments in the shapes chat templates expect."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import InvalidRequestError
from ..protocols.openai.types import ChatCompletionRequest, ChatMessage, NamedToolChoice, TextPart

# Templates know system, user, assistant and tool; OpenAI's newer "developer" role is a system one.
ROLE_FOR_TEMPLATE = {"developer": "system"}

# apply_chat_template's own parameters: a template keyword argument must not replace them.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)


@dataclass(frozen=True)
class ToolSpec:
    name: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolPolicy:
    """What this request allows: `offered` is empty when no call may be parsed."""

    offered: tuple[ToolSpec, ...] = ()
    choice: Literal["auto", "required", "named"] = "auto"
    forced_name: str | None = None
    parallel: bool = True

    @property
    def forced(self) -> bool:
        return self.choice != "auto"

    @property
    def offered_names(self) -> frozenset[str]:
        return frozenset(tool.name for tool in self.offered)


def tool_policy(body: ChatCompletionRequest) -> ToolPolicy:
    """Check the tool fields against each other and name the parameter of the first problem."""
    _check_tool_fields(body)
    choice = body.tool_choice
    if not body.tools or choice == "none":
        return ToolPolicy()
    offered = tuple(
        ToolSpec(tool.function.name, tool.function.parameters or {"type": "object"})
        for tool in body.tools
    )
    parallel = body.parallel_tool_calls is not False
    if isinstance(choice, NamedToolChoice):
        return ToolPolicy(offered, "named", choice.function.name, parallel=False)
    return ToolPolicy(offered, "required" if choice == "required" else "auto", parallel=parallel)


def _check_tool_fields(body: ChatCompletionRequest) -> None:
    if body.tools is None:
        # Without tools, "none", "auto" and parallel_tool_calls hold trivially (no call can be
        # made), and some clients always send them; a demanded call cannot be honoured.
        if body.tool_choice not in (None, "none", "auto"):
            raise InvalidRequestError(
                "Invalid value for 'tool_choice': a call can only be required when 'tools' "
                "are specified.",
                param="tool_choice",
            )
        return
    names: set[str] = set()
    for index, tool in enumerate(body.tools):
        if tool.function.name in names:
            raise InvalidRequestError(
                f"Duplicate function name {tool.function.name!r} in tools.",
                param=f"tools[{index}].function.name",
            )
        names.add(tool.function.name)
    choice = body.tool_choice
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise InvalidRequestError(
            f"Invalid value for 'tool_choice': no function named {choice.function.name!r} "
            "is in 'tools'.",
            param="tool_choice",
        )


def check_conversation(messages: list[ChatMessage]) -> None:
    """Tool calls and results must pair up the way OpenAI requires."""
    open_calls: dict[str, str] = {}
    for index, message in enumerate(messages):
        _check_message_fields(index, message)
        if message.role == "tool":
            if message.tool_call_id not in open_calls:
                raise InvalidRequestError(
                    "Invalid parameter: messages with role 'tool' must be a response to a "
                    "preceding message with 'tool_calls' holding the same id.",
                    param=f"messages[{index}].tool_call_id",
                )
            continue
        open_calls = {call.id: call.function.name for call in message.tool_calls or ()}


def _check_message_fields(index: int, message: ChatMessage) -> None:
    where = f"messages[{index}]"
    if message.role == "tool" and message.tool_call_id is None:
        raise InvalidRequestError(
            "Missing required parameter: a tool message needs 'tool_call_id'.",
            param=f"{where}.tool_call_id",
        )
    misplaced = [
        ("tool_calls", message.tool_calls is not None and message.role != "assistant"),
        ("tool_call_id", message.tool_call_id is not None and message.role != "tool"),
        (
            "reasoning_content",
            message.reasoning_content is not None and message.role != "assistant",
        ),
        ("reasoning", message.reasoning is not None and message.role != "assistant"),
    ]
    for field_name, wrong in misplaced:
        if wrong:
            raise InvalidRequestError(
                f"'{field_name}' is not allowed on a message with role '{message.role}'.",
                param=f"{where}.{field_name}",
            )
    for call_index, call in enumerate(message.tool_calls or ()):
        if not isinstance(_json_object_or_none(call.function.arguments), dict):
            raise InvalidRequestError(
                "Tool call arguments must be a JSON object encoded as a string.",
                param=f"{where}.tool_calls[{call_index}].function.arguments",
            )


def _json_object_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def template_messages(
    messages: list[ChatMessage], *, multimodal: bool = False
) -> list[dict[str, Any]]:
    """Messages as Hugging Face chat templates read them (arguments as objects, not strings).

    `multimodal`: content as a list of parts, `{"type": "image"}` where an image goes, which is
    what vision-language models' templates iterate over (for text-only messages too).
    """
    names_by_id: dict[str, str] = {}
    conversation = []
    for message in messages:
        entry: dict[str, Any] = {
            "role": ROLE_FOR_TEMPLATE.get(message.role, message.role),
            "content": template_parts(message) if multimodal else message.text(),
        }
        if message.name is not None:
            entry["name"] = message.name
        reasoning = message.reasoning_content or message.reasoning
        if reasoning:
            entry["reasoning_content"] = reasoning
        if message.tool_calls:
            entry["tool_calls"] = [_template_call(call) for call in message.tool_calls]
            names_by_id.update({call.id: call.function.name for call in message.tool_calls})
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
            entry.setdefault("name", names_by_id.get(message.tool_call_id, ""))
        conversation.append(entry)
    return conversation


def template_parts(message: ChatMessage) -> list[dict[str, Any]]:
    """Text and image parts in order; never empty (templates read the first part's type)."""
    content = message.content
    if not isinstance(content, list):
        return [{"type": "text", "text": content or ""}]
    parts = [
        {"type": "text", "text": part.text} if isinstance(part, TextPart) else {"type": "image"}
        for part in content
    ]
    return parts or [{"type": "text", "text": ""}]


def _template_call(call: Any) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.function.name, "arguments": json.loads(call.function.arguments)},
    }


def template_tools(body: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """The tools as OpenAI sends them, which is also the shape templates iterate over.

    With tool_choice "none" the model is not shown the tools at all, so it answers in words.
    """
    if not body.tools or body.tool_choice == "none":
        return None
    return [tool.model_dump(exclude_none=True) for tool in body.tools]


def template_kwargs(body: ChatCompletionRequest) -> dict[str, Any]:
    """`reasoning_effort` and `chat_template_kwargs` (e.g. enable_thinking) for the template."""
    kwargs: dict[str, Any] = {}
    if body.reasoning_effort is not None:
        kwargs["reasoning_effort"] = body.reasoning_effort
    for key, value in (body.chat_template_kwargs or {}).items():
        if key in RESERVED_TEMPLATE_KWARGS or not key.isidentifier():
            raise InvalidRequestError(
                f"chat_template_kwargs may not set {key!r}.", param=f"chat_template_kwargs.{key}"
            )
        kwargs[key] = value
    return kwargs
