"""The model's raw text split into reasoning, content and tool calls, as it streams.

One state machine serves streaming and non-streaming answers alike (a whole answer is one feed),
so both always agree. Text that might be the start of a marker is held back until it is known
not to be one: no `<tool_call>` or `<think>` half reaches a client's content, and a call that
max_tokens cut off before it was complete is dropped, never shown as text (OpenAI reports such an
answer with finish_reason "length" and no partial call); the calls of that block written in full
before the cut are kept.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from .parsers import ParsedCall, ToolCallFormat

Mode = Literal["reasoning", "content", "tool"]


@dataclass(frozen=True)
class ReasoningMarkers:
    start: str
    end: str


@dataclass(frozen=True)
class OutputRules:
    """How one request's output is split; built once per request from the model and the body."""

    reasoning: ReasoningMarkers | None = None
    starts_in_reasoning: bool = False
    tools: ToolCallFormat | None = None
    offered: frozenset[str] = frozenset()
    parallel: bool = True


@dataclass(frozen=True)
class Reasoning:
    text: str


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class ToolCallOut:
    index: int
    id: str
    name: str
    arguments: str  # a JSON object, as text


Part = Reasoning | Content | ToolCallOut


@dataclass
class ParsedOutput:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallOut] = field(default_factory=list)

    def add(self, parts: list[Part]) -> None:
        for part in parts:
            if isinstance(part, Reasoning):
                self.reasoning += part.text
            elif isinstance(part, Content):
                self.content += part.text
            else:
                self.tool_calls.append(part)


def split_whole(rules: OutputRules, text: str, *, cut_off: bool = False) -> ParsedOutput:
    splitter = OutputSplitter(rules)
    output = ParsedOutput()
    output.add(splitter.feed(text))
    output.add(splitter.finish(cut_off=cut_off))
    return output


def without_reasoning(text: str, markers: ReasoningMarkers, *, starts_in_reasoning: bool) -> str:
    """The answer in a text the model wrote for the server itself (a summary): split as a
    client's answer is, and cut after an end marker still left, which a model writes when it
    reasons though its prompt closed the thinking block."""
    rules = OutputRules(reasoning=markers, starts_in_reasoning=starts_in_reasoning)
    return split_whole(rules, text).content.rpartition(markers.end)[2]


class OutputSplitter:
    def __init__(self, rules: OutputRules) -> None:
        self._rules = rules
        self._mode: Mode = (
            "reasoning" if rules.reasoning and rules.starts_in_reasoning else "content"
        )
        self._buffer = ""
        self._parts: list[Part] = []
        self._block_start = ""
        self._calls = 0
        self._content_started = False
        self._strip_leading = False
        self._held_space = ""  # trailing whitespace kept back while tool calls may follow

    @property
    def made_tool_calls(self) -> bool:
        return self._calls > 0

    def feed(self, text: str) -> list[Part]:
        self._buffer += text
        self._advance(final=False)
        return self._take()

    def finish(self, *, cut_off: bool = False) -> list[Part]:
        """The rest of the output; `cut_off`: the generation ended at max_tokens."""
        self._advance(final=True)
        if self._mode == "tool":
            self._close_block(self._buffer, unfinished=cut_off)
            self._buffer = ""
        if self._held_space and not self._calls:
            self._parts.append(Content(self._held_space))
        self._held_space = ""
        return self._take()

    def _take(self) -> list[Part]:
        parts, self._parts = self._parts, []
        return parts

    def _advance(self, *, final: bool) -> None:
        while True:
            if self._mode == "reasoning":
                moved = self._advance_reasoning(final=final)
            elif self._mode == "content":
                moved = self._advance_content(final=final)
            else:
                moved = self._advance_tool()
            if not moved:
                return

    def _advance_reasoning(self, *, final: bool) -> bool:
        if self._rules.reasoning is None:
            return False
        end = self._rules.reasoning.end
        found = self._buffer.find(end)
        if found >= 0:
            self._emit_reasoning(self._buffer[:found])
            self._buffer = self._buffer[found + len(end) :]
            self._mode = "content"
            self._strip_leading = True
            return True
        keep = 0 if final else held_prefix_length(self._buffer, (end,))
        self._emit_reasoning(self._buffer[: len(self._buffer) - keep])
        self._buffer = self._buffer[len(self._buffer) - keep :]
        return False

    def _advance_content(self, *, final: bool) -> bool:
        if self._starts_leading_json(final=final):
            return True
        markers = self._content_markers()
        found, marker = earliest(self._buffer, markers)
        if marker:
            self._emit_content(self._buffer[:found])
            self._buffer = self._buffer[found + len(marker) :]
            self._enter(marker)
            return True
        keep = 0 if final else held_prefix_length(self._buffer, markers)
        if not final and self._leading_json_undecided() and not self._buffer.strip():
            keep = len(self._buffer)
        self._emit_content(self._buffer[: len(self._buffer) - keep])
        self._buffer = self._buffer[len(self._buffer) - keep :]
        return False

    def _advance_tool(self) -> bool:
        end = self._rules.tools.end if self._rules.tools else ""
        found = self._buffer.find(end) if end else -1
        if found < 0:
            return False
        self._close_block(self._buffer[:found], closed_by=end)
        self._buffer = self._buffer[found + len(end) :]
        self._mode = "content"
        return True

    def _content_markers(self) -> tuple[str, ...]:
        markers = self._rules.tools.starts if self._rules.tools else ()
        if self._rules.reasoning:
            markers = (self._rules.reasoning.start, *markers)
        return tuple(marker for marker in markers if marker)

    def _enter(self, marker: str) -> None:
        if self._rules.reasoning and marker == self._rules.reasoning.start:
            self._mode = "reasoning"
        else:
            self._mode = "tool"
            self._block_start = marker

    def _leading_json_undecided(self) -> bool:
        """Only whitespace so far, in a family whose whole answer may be a JSON call."""
        tools = self._rules.tools
        return bool(tools and tools.leading_json and not self._content_started and not self._calls)

    def _starts_leading_json(self, *, final: bool) -> bool:
        if not self._leading_json_undecided():
            return False
        stripped = self._buffer.lstrip()
        if not stripped.startswith("{"):
            return False
        self._buffer = stripped
        self._mode = "tool"
        self._block_start = ""
        return True

    def _emit_reasoning(self, text: str) -> None:
        if text:
            self._parts.append(Reasoning(text))

    def _emit_content(self, text: str) -> None:
        if self._strip_leading:
            text = text.lstrip()
            self._strip_leading = not text
        if not text:
            return
        if self._rules.tools is None:
            self._content_started = True
            self._parts.append(Content(text))
            return
        text = self._held_space + text
        body = text.rstrip()
        self._held_space = text[len(body) :]
        if body:
            self._content_started = True
            self._parts.append(Content(body))

    def _close_block(self, body: str, closed_by: str = "", *, unfinished: bool = False) -> None:
        calls = self._accepted_calls(body)
        if calls is None and unfinished and self._opens_call(body):
            calls = self._calls_complete_before_cut(body)
            if not calls:
                return
        if calls is None:
            self._emit_content(self._block_start + body + closed_by)
            return
        self._held_space = ""
        for call in calls:
            if self._calls and not self._rules.parallel:
                return  # parallel_tool_calls: false keeps the first call only
            arguments = json.dumps(call.arguments, ensure_ascii=False)
            self._parts.append(ToolCallOut(self._calls, new_call_id(), call.name, arguments))
            self._calls += 1

    def _opens_call(self, body: str) -> bool:
        """A block after a call marker is a call; leading JSON only if it begins like one."""
        tools = self._rules.tools
        return bool(self._block_start) or (tools is not None and tools.opens_call(body))

    def _accepted_calls(self, body: str) -> list[ParsedCall] | None:
        """The block's calls, or None when anything is off: then the block is plain content."""
        if self._rules.tools is None:
            return None
        return self._offered_calls(self._rules.tools.parse, body)

    def _calls_complete_before_cut(self, body: str) -> list[ParsedCall] | None:
        """Of a block max_tokens cut off, the calls written in full (the cut one is dropped)."""
        tools = self._rules.tools
        if tools is None or tools.complete_calls is None:
            return None
        return self._offered_calls(tools.complete_calls, body)

    def _offered_calls(
        self, parse: Callable[[str], list[ParsedCall]], body: str
    ) -> list[ParsedCall] | None:
        try:
            calls = parse(body)
        except Exception:  # parsers (ours and mlx-lm's) raise many kinds on malformed text
            return None
        offered = self._rules.offered
        if not calls or any(
            call.name not in offered or not isinstance(call.arguments, dict) for call in calls
        ):
            return None
        return calls


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def earliest(text: str, markers: tuple[str, ...]) -> tuple[int, str]:
    """Where the first of `markers` occurs in `text`, and which; (-1, "") when none does."""
    best, found = -1, ""
    for marker in markers:
        position = text.find(marker)
        if position >= 0 and (best < 0 or position < best):
            best, found = position, marker
    return best, found


def held_prefix_length(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that could grow into one of `markers`."""
    longest = 0
    for marker in markers:
        for length in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:length]):
                longest = length
                break
    return longest
