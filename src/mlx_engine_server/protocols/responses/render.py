"""OpenAI Responses answers: the `response` object and its stream of events.

One builder turns the split output (reasoning, content, tool calls) into output items for both:
a whole answer is the items once every part was added, a stream is the events on the way.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ...chat.output import Content, Part, Reasoning, ToolCallOut
from ...engine import Finished, TokenLogprob, Usage
from ...errors import APIError
from ..openai.render import chat_logprobs

Event = dict[str, Any]


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def text_logprobs(logprobs: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """An output_text part's `logprobs`: chat completions' entries (token, logprob, bytes,
    top_logprobs)."""
    content: list[dict[str, Any]] = chat_logprobs(tuple(logprobs))["content"]
    return content


def delta_logprobs(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same entries as `response.output_text.delta`/`.done` events carry them: no bytes."""
    return [
        {
            "token": entry["token"],
            "logprob": entry["logprob"],
            "top_logprobs": [
                {"token": top["token"], "logprob": top["logprob"]} for top in entry["top_logprobs"]
            ],
        }
        for entry in entries
    ]


class OutputItems:
    """Output items built part by part; `add` and `close` return the stream events (without
    their sequence numbers)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self._open: str | None = None  # type of the item still receiving text
        self.reasoning_text = ""
        # Logprobs of tokens whose text is not out yet: they go with the next output_text delta
        # (or the message's last, when it closes), as chat completions attach them.
        self._pending_logprobs: list[dict[str, Any]] = []

    def add(self, parts: list[Part], logprobs: Sequence[TokenLogprob] = ()) -> list[Event]:
        self._pending_logprobs.extend(text_logprobs(logprobs))
        events: list[Event] = []
        for part in parts:
            if isinstance(part, Reasoning):
                self.reasoning_text += part.text
                events.extend(self._extend("reasoning", part.text))
            elif isinstance(part, Content):
                events.extend(self._extend("message", part.text))
            else:
                events.extend(self._function_call(part))
        return events

    def close(self, status: str = "completed") -> list[Event]:
        if self._open is None:
            return []
        self._open = None
        index = len(self.items) - 1
        item = self.items[index]
        item["status"] = status
        part = item["content"][0]
        ids = {"item_id": item["id"], "output_index": index}
        kind = "reasoning_text" if item["type"] == "reasoning" else "output_text"
        done: Event = {"type": f"response.{kind}.done", **ids, "content_index": 0}
        done["text"] = part["text"]
        if kind == "output_text":
            part["logprobs"].extend(self._take_logprobs())
            done["logprobs"] = delta_logprobs(part["logprobs"])
        return [
            done,
            {"type": "response.content_part.done", **ids, "content_index": 0, "part": part},
            {"type": "response.output_item.done", "output_index": index, "item": item},
        ]

    def _extend(self, kind: str, text: str) -> list[Event]:
        events = []
        if self._open != kind:
            events.extend(self.close())
            events.extend(self._open_item(kind))
        index = len(self.items) - 1
        item = self.items[index]
        item["content"][0]["text"] += text
        delta_type = "reasoning_text" if kind == "reasoning" else "output_text"
        delta: Event = {"type": f"response.{delta_type}.delta", "item_id": item["id"]}
        delta.update(output_index=index, content_index=0, delta=text)
        if kind == "message":
            taken = self._take_logprobs()
            item["content"][0]["logprobs"].extend(taken)
            delta["logprobs"] = delta_logprobs(taken)
        events.append(delta)
        return events

    def _take_logprobs(self) -> list[dict[str, Any]]:
        taken, self._pending_logprobs = self._pending_logprobs, []
        return taken

    def _open_item(self, kind: str) -> list[Event]:
        if kind == "reasoning":
            item: dict[str, Any] = {"type": "reasoning", "id": new_id("rs"), "summary": []}
            part: dict[str, Any] = {"type": "reasoning_text", "text": ""}
        else:
            item = {"type": "message", "id": new_id("msg"), "role": "assistant"}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        item.update(status="in_progress", content=[])
        added = self._added(item)
        item["content"].append(part)
        self._open = kind
        ids = {"item_id": item["id"], "output_index": len(self.items) - 1}
        return [
            added,
            {"type": "response.content_part.added", **ids, "content_index": 0, "part": dict(part)},
        ]

    def _function_call(self, call: ToolCallOut) -> list[Event]:
        events = self.close()
        item = {
            "type": "function_call",
            "id": new_id("fc"),
            "call_id": call.id,
            "name": call.name,
            "arguments": "",
            "status": "in_progress",
        }
        events.append(self._added(item))
        item.update(arguments=call.arguments, status="completed")
        ids = {"item_id": item["id"], "output_index": len(self.items) - 1}
        events.append(
            {"type": "response.function_call_arguments.delta", **ids, "delta": call.arguments}
        )
        events.append(
            {
                "type": "response.function_call_arguments.done",
                **ids,
                "arguments": call.arguments,
                "name": call.name,
            }
        )
        events.append(
            {"type": "response.output_item.done", "output_index": ids["output_index"], "item": item}
        )
        return events

    def _added(self, item: dict[str, Any]) -> Event:
        self.items.append(item)
        snapshot = {**item, "content": []} if "content" in item else dict(item)
        return {
            "type": "response.output_item.added",
            "output_index": len(self.items) - 1,
            "item": snapshot,
        }


@dataclass(frozen=True)
class ResponseHead:
    """What the response object repeats of its request, for every event that carries it."""

    id: str
    created_at: int
    model: str
    echo: dict[str, Any]  # instructions, tools, tool_choice, sampling, text, reasoning, ...

    @classmethod
    def new(cls, model: str, echo: dict[str, Any]) -> ResponseHead:
        return cls(new_id("resp"), int(time.time()), model, echo)


def response_body(
    head: ResponseHead,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {
        "id": head.id,
        "object": "response",
        "created_at": head.created_at,
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": incomplete,
        "model": head.model,
        "output": output,
        "previous_response_id": None,
        "store": False,
        "truncation": "disabled",
        **head.echo,
        "usage": usage,
    }


def usage_body(usage: Usage, reasoning_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {
            "reasoning_tokens": min(reasoning_tokens, usage.completion_tokens)
        },
        "total_tokens": usage.total_tokens,
    }


def final_status(finish_reason: str) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


class ResponseStream:
    """The event sequence of one streamed response, as the `openai` SDK reads it."""

    def __init__(
        self, head: ResponseHead, count_tokens: Callable[[str], int], summary: Usage | None
    ) -> None:
        self.head = head
        self.items = OutputItems()
        self.count_tokens = count_tokens
        self.summary = summary
        self.final: dict[str, Any] | None = None  # the finished response object
        self._sequence = 0

    def opening(self) -> list[Event]:
        body = response_body(self.head, "in_progress", [])
        return self._numbered(
            [
                {"type": "response.created", "response": body},
                {"type": "response.in_progress", "response": body},
            ]
        )

    def parts(self, parts: list[Part], logprobs: Sequence[TokenLogprob] = ()) -> list[Event]:
        return self._numbered(self.items.add(parts, logprobs))

    def closing(self, finished: Finished, made_tool_calls: bool) -> list[Event]:
        status = final_status(finished.finish_reason)
        events = self.items.close("incomplete" if status == "incomplete" else "completed")
        usage = usage_body(
            finished.usage.with_summary(self.summary), self.count_tokens(self.items.reasoning_text)
        )
        body = response_body(self.head, status, self.items.items, usage)
        self.final = body
        events.append({"type": f"response.{status}", "response": body})
        return self._numbered(events)

    def failure(self, error: APIError) -> list[Event]:
        failed = {"code": "server_error", "message": error.message}
        body = response_body(self.head, "failed", self.items.items, error=failed)
        error_event = {
            "type": "error",
            "code": error.code,
            "message": error.message,
            "param": error.param,
        }
        return self._numbered([error_event, {"type": "response.failed", "response": body}])

    def _numbered(self, events: list[Event]) -> list[Event]:
        for event in events:
            event["sequence_number"] = self._sequence
            self._sequence += 1
        return events
