"""Tools for a model whose chat template does not render them (llama.cpp's "generic" format).

The tool list goes into the system message in the format docs/tool-fallback.md documents; the
model answers either in plain text or with one JSON object `{"tool_calls": [{"name",
"arguments"}, ...]}`, which the grammar enforces (chat/tool_grammar.py) and parsers/generic.py
reads back. Earlier calls and their results are written into the conversation in the same JSON,
since the template cannot render `tool_calls` or `tool` messages either.
"""

from __future__ import annotations

import json
from typing import Any

from ..protocols.openai.types import ChatCompletionRequest, ChatMessage
from .tools import template_messages

TEXT_ANSWER = r"/[^{ \t\r\n](?s:.*)/"  # plain text: anything that does not open a JSON object

INSTRUCTIONS = """\
# Tools

You can call these functions (each given as a JSON object: name, description, parameters as a \
JSON schema):
{tools}

To call functions, answer with nothing but one JSON object of this form:
{{"tool_calls": [{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}]}}
Each result then comes back in a user message as {{"tool_response": {{"name": "<function \
name>", "content": "<result>"}}}}.
To answer without calling a function, write the answer as plain text."""


def template_renders_tools(tokenizer: Any) -> bool:
    """The same test the prompt builder makes before it hands `tools` to a template."""
    return "tools" in str(getattr(tokenizer, "chat_template", None) or "")


def fallback_conversation(
    conversation: list[dict[str, Any]], body: ChatCompletionRequest
) -> list[dict[str, Any]]:
    """`conversation` (template messages) with the tools in its system message, and earlier
    calls and results written out as the documented JSON."""
    turns = _calls_as_text(conversation)
    if not body.tools or body.tool_choice == "none":
        return turns
    return _with_instructions(turns, tool_instructions(body))


def tool_instructions(body: ChatCompletionRequest) -> str:
    tools = [
        {
            "name": tool.function.name,
            "description": tool.function.description or "",
            "parameters": tool.function.parameters or {"type": "object"},
        }
        for tool in body.tools or ()
    ]
    listing = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return INSTRUCTIONS.format(tools=listing)


def transcript_lines(messages: list[ChatMessage]) -> list[str]:
    """Each message as `role: text` for a summary's transcript, its tool calls and results
    written in the JSON this fallback writes them in: the summary keeps what was called."""
    lines = []
    for message, entry in zip(messages, template_messages(messages), strict=True):
        if entry.get("tool_calls"):
            text = _text(_assistant_calls(entry))
        elif message.role == "tool":
            text = _tool_response(entry)
        else:
            text = message.text()
        lines.append(f"{message.role}: {text}")
    return lines


def _with_instructions(
    conversation: list[dict[str, Any]], instructions: str
) -> list[dict[str, Any]]:
    if conversation and conversation[0]["role"] == "system":
        first = conversation[0]
        merged = {**first, "content": _joined(instructions, first["content"])}
        return [merged, *conversation[1:]]
    multimodal = any(isinstance(entry["content"], list) for entry in conversation)
    content: Any = [{"type": "text", "text": instructions}] if multimodal else instructions
    return [{"role": "system", "content": content}, *conversation]


def _joined(instructions: str, content: Any) -> Any:
    if isinstance(content, list):
        return [{"type": "text", "text": instructions + "\n\n"}, *content]
    return f"{instructions}\n\n{content}" if content else instructions


def _calls_as_text(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assistant calls as the JSON the model writes; each run of tool results as one user
    message (templates that insist on alternating roles accept it)."""
    turns: list[dict[str, Any]] = []
    results: list[str] = []  # the run of tool results not yet written out
    for entry in conversation:
        if entry["role"] == "tool":
            results.append(_tool_response(entry))
            continue
        if results:
            turns.append({"role": "user", "content": _shaped_like(entry["content"], results)})
            results = []
        turns.append(_assistant_calls(entry) if entry.get("tool_calls") else entry)
    if results:
        turns.append(
            {"role": "user", "content": _shaped_like(conversation[-1]["content"], results)}
        )
    return turns


def _tool_response(entry: dict[str, Any]) -> str:
    response = {"name": entry.get("name", ""), "content": _text(entry)}
    return json.dumps({"tool_response": response}, ensure_ascii=False)


def _assistant_calls(entry: dict[str, Any]) -> dict[str, Any]:
    calls = [
        {"name": call["function"]["name"], "arguments": call["function"]["arguments"]}
        for call in entry["tool_calls"]
    ]
    written = json.dumps({"tool_calls": calls}, ensure_ascii=False)
    text = _text(entry)
    rest = {key: value for key, value in entry.items() if key != "tool_calls"}
    return {**rest, "content": _shaped_like(entry["content"], [text, written])}


def _shaped_like(content: Any, lines: list[str]) -> Any:
    """`lines` as one text, a list of parts where the conversation uses parts (vision)."""
    text = "\n".join(line for line in lines if line)
    return [{"type": "text", "text": text}] if isinstance(content, list) else text


def _text(entry: dict[str, Any]) -> str:
    content = entry.get("content")
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if part.get("type") == "text")
    return str(content or "")
