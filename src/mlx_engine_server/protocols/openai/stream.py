"""OpenAI's stream chunks for chat and text completions, one choice index at a time."""

from __future__ import annotations

from typing import Any

from ...chat.output import Content, OutputRules, OutputSplitter, Part, Reasoning
from ...engine import TextDelta, Usage
from .render import (
    ResponseHeader,
    chat_chunk,
    chat_finish_reason,
    chat_logprobs,
    chat_usage_chunk,
    reasoning_fields,
    text_chunk,
    text_logprobs,
    text_usage_chunk,
    tool_call_deltas,
)


class ChatShape:
    """Chat chunks: each choice's text split into reasoning, content and tool-call deltas."""

    def __init__(
        self,
        head: ResponseHeader,
        include_usage: bool,
        with_logprobs: bool,
        rules: OutputRules,
        summary: Usage | None = None,
    ) -> None:
        self.head = head
        self.include_usage = include_usage
        self.with_logprobs = with_logprobs
        self.summary = summary
        self._rules = rules
        self._splitters: dict[int, OutputSplitter] = {}

    def opening(self, index: int) -> dict[str, Any] | None:
        return self._chunk(index, {"role": "assistant", "content": ""})

    def deltas(self, index: int, delta: TextDelta) -> list[dict[str, Any]]:
        chunks = self._part_chunks(index, self._splitter(index).feed(delta.text))
        if self.with_logprobs and delta.logprobs:
            # Logprobs travel with the first chunk of their text; text held back (it may be
            # the start of a tool-call marker) leaves them on an empty content delta.
            if not chunks:
                chunks = [self._chunk(index, {"content": ""})]
            chunks[0]["choices"][0]["logprobs"] = chat_logprobs(delta.logprobs)
        return chunks

    def closing(self, index: int, finish: str) -> list[dict[str, Any]]:
        splitter = self._splitter(index)
        chunks = self._part_chunks(index, splitter.finish(cut_off=finish == "length"))
        reason = chat_finish_reason(finish, made_tool_calls=splitter.made_tool_calls)
        return [*chunks, self._chunk(index, {}, reason)]

    def usage(self, usage: Usage) -> dict[str, Any]:
        return chat_usage_chunk(self.head, usage.with_summary(self.summary))

    def _splitter(self, index: int) -> OutputSplitter:
        if index not in self._splitters:
            self._splitters[index] = OutputSplitter(self._rules)
        return self._splitters[index]

    def _part_chunks(self, index: int, parts: list[Part]) -> list[dict[str, Any]]:
        chunks = []
        for part in parts:
            if isinstance(part, Reasoning):
                chunks.append(self._chunk(index, reasoning_fields(part.text)))
            elif isinstance(part, Content):
                chunks.append(self._chunk(index, {"content": part.text}))
            else:
                chunks.extend(self._chunk(index, delta) for delta in tool_call_deltas(part))
        return chunks

    def _chunk(
        self, index: int, delta: dict[str, Any], finish: str | None = None
    ) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        return chat_chunk(self.head, choice, with_usage_field=self.include_usage)


class TextShape:
    def __init__(
        self,
        head: ResponseHeader,
        include_usage: bool,
        with_logprobs: bool,
        echoes: list[str] | None = None,
    ) -> None:
        self.head = head
        self.include_usage = include_usage
        self.with_logprobs = with_logprobs
        self.echoes = echoes
        self._offsets: dict[int, int] = {}

    def opening(self, index: int) -> dict[str, Any] | None:
        if not self.echoes or not self.echoes[index]:
            return None
        return self._chunk(index, self.echoes[index])

    def deltas(self, index: int, delta: TextDelta) -> list[dict[str, Any]]:
        if not delta.text and not delta.logprobs:
            return []
        logprobs = None
        if self.with_logprobs:
            offset = self._offsets.get(index, 0)
            logprobs = text_logprobs(delta.logprobs, offset)
            self._offsets[index] = offset + sum(len(token) for token in logprobs["tokens"])
        return [self._chunk(index, delta.text, logprobs=logprobs)]

    def closing(self, index: int, finish: str) -> list[dict[str, Any]]:
        return [self._chunk(index, "", finish)]

    def usage(self, usage: Usage) -> dict[str, Any]:
        return text_usage_chunk(self.head, usage)

    def _chunk(
        self,
        index: int,
        text: str,
        finish: str | None = None,
        logprobs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        choice = {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}
        return text_chunk(self.head, choice, with_usage_field=self.include_usage)
