"""The context-overflow policy: what happens when a conversation plus its answer exceed the window.

`error` refuses (OpenAI's answer). `truncate` drops the oldest turns. `summarize` replaces them with
one system message holding a summary the served model wrote. Only whole messages go: system and
developer messages stay, a tool result stays with the assistant message before it, and the last
user message (with whatever follows it) always stays.

Tokens are counted with a `render` function that builds the prompt exactly as the request's real
prompt is built; the summary is written by a `Summarizer` the caller supplies (the engine).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from ..errors import ContextLengthExceededError
from ..protocols.openai.types import ChatMessage, OverflowPolicy
from .tool_fallback import transcript_lines

PINNED_ROLES = frozenset({"system", "developer"})
SUMMARY_LABEL = "Summary of the earlier conversation:"
SUMMARY_INSTRUCTION = (
    "Summarize the conversation below in a few sentences. Keep names, numbers, facts, decisions "
    "and open questions. Write only the summary."
)
CUT_MARK = "[...]\n"
# A token of text rarely spans more characters than this: the summary prompt never looks further
# back than budget x this many characters, whatever the length of the history.
MAX_CHARS_PER_TOKEN = 16

Render = Callable[[list[ChatMessage]], list[int]]
# A floor under the prompt's length, cheap to compute (from characters): truncate's search skips
# rendering a candidate the floor already puts over the budget.
AtLeast = Callable[[list[ChatMessage]], int]


def no_floor(_: list[ChatMessage]) -> int:
    return 0


@dataclass(frozen=True)
class Limits:
    """The window, and the room the answer needs: max_tokens, or a reserve when it is absent."""

    context_window: int
    completion_tokens: int
    max_tokens_requested: bool

    @property
    def prompt_budget(self) -> int:
        return self.context_window - self.completion_tokens


@dataclass(frozen=True)
class Summary:
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


class Summarizer(Protocol):
    """Writes summaries with the served model."""

    def prompt_tokens(self, messages: list[ChatMessage]) -> list[int]: ...
    async def summarize(self, prompt_tokens: list[int], max_tokens: int) -> Summary: ...


@dataclass(frozen=True)
class SummaryOptions:
    keep_messages: int
    max_tokens: int
    summarizer: Summarizer


@dataclass(frozen=True)
class Compaction:
    """What the policy did to the conversation; the client sees it in a response header."""

    policy: Literal["truncate", "summarize"]
    dropped: int = 0  # messages removed without a trace
    summarized: int = 0  # messages replaced by the summary
    unread: int = 0  # of those, messages the summarizer saw only in part (history > window)
    summary: Summary | None = None

    def header_value(self) -> str:
        if self.policy == "truncate":
            return f"truncate; dropped={self.dropped}"
        unread = f"; unread={self.unread}" if self.unread else ""
        return f"summarize; summarized={self.summarized}{unread}"


@dataclass(frozen=True)
class Fitted:
    messages: list[ChatMessage]
    prompt: list[int]
    compaction: Compaction | None = None


async def fit_conversation(
    messages: list[ChatMessage],
    render: Render,
    limits: Limits,
    policy: OverflowPolicy,
    summary: SummaryOptions,
) -> Fitted:
    """The conversation as the model will see it; ContextLengthExceededError if it cannot fit.

    Under `error` nothing changes here: the max_tokens check that follows refuses as before.
    """
    fitted = fit_without_model(messages, render, limits, policy)
    return fitted if fitted is not None else await summarize(messages, render, limits, summary)


def fit_without_model(
    messages: list[ChatMessage],
    render: Render,
    limits: Limits,
    policy: OverflowPolicy,
    at_least: AtLeast = no_floor,
) -> Fitted | None:
    """fit_conversation's CPU part (a thread may run it): None when a summary is needed."""
    surely_over = at_least(messages) > limits.prompt_budget
    if policy == "truncate" and surely_over and limits.prompt_budget >= 1:
        return truncate(messages, render, limits, at_least)  # no render of the whole
    prompt = render(messages)
    if policy == "error" or len(prompt) <= limits.prompt_budget:
        return Fitted(messages, prompt)
    if limits.prompt_budget < 1:
        raise overflow_error(limits, len(prompt), "")
    if policy == "truncate":
        return truncate(messages, render, limits, at_least)
    return None


def overflow_error(limits: Limits, prompt_tokens: int, after: str) -> ContextLengthExceededError:
    answer = limits.completion_tokens
    for_answer = "for the completion" if limits.max_tokens_requested else "kept for the answer"
    return ContextLengthExceededError(
        f"This model's maximum context length is {limits.context_window} tokens. However, you "
        f"requested {prompt_tokens + answer} tokens ({prompt_tokens} in the prompt{after}, "
        f"{answer} {for_answer}). Please reduce the prompt or max_tokens.",
        param="max_tokens" if limits.max_tokens_requested else "messages",
    )


def droppable_units(messages: Sequence[ChatMessage]) -> list[tuple[int, ...]]:
    """Indices of the messages that may go, oldest first, in units that go together.

    A unit is a whole turn (a user message and what follows it up to the next user message)
    before the last user message; after it, an assistant message with its tool results, except
    the newest. System and developer messages are never in a unit.
    """
    turns = _turns(messages, _exchanges(messages))
    if not turns:
        return []
    *earlier, last = turns
    units = [tuple(index for exchange in turn for index in exchange) for turn in earlier]
    starts_with_user = messages[last[0][0]].role == "user"
    inner = last[1:-1] if starts_with_user else last[:-1]
    return units + [tuple(exchange) for exchange in inner]


def _exchanges(messages: Sequence[ChatMessage]) -> list[list[int]]:
    """Non-pinned messages; a tool result joins the message it answers."""
    exchanges: list[list[int]] = []
    for index, message in enumerate(messages):
        if message.role in PINNED_ROLES:
            continue
        if message.role == "tool" and exchanges:
            exchanges[-1].append(index)
        else:
            exchanges.append([index])
    return exchanges


def _turns(messages: Sequence[ChatMessage], exchanges: list[list[int]]) -> list[list[list[int]]]:
    turns: list[list[list[int]]] = []
    for exchange in exchanges:
        if not turns or messages[exchange[0]].role == "user":
            turns.append([exchange])
        else:
            turns[-1].append(exchange)
    return turns


def _without(
    messages: Sequence[ChatMessage], units: Sequence[tuple[int, ...]]
) -> list[ChatMessage]:
    gone = {index for unit in units for index in unit}
    return [message for index, message in enumerate(messages) if index not in gone]


def truncate(
    messages: list[ChatMessage], render: Render, limits: Limits, at_least: AtLeast = no_floor
) -> Fitted:
    """Drop the fewest oldest units that make the prompt fit (a binary search over renders)."""
    units = droppable_units(messages)
    best: Fitted | None = None
    low, high = 1, len(units)
    while low <= high:
        middle = (low + high) // 2
        kept = _without(messages, units[:middle])
        if at_least(kept) > limits.prompt_budget:
            low = middle + 1
            continue
        prompt = render(kept)
        if len(prompt) <= limits.prompt_budget:
            dropped = Compaction("truncate", dropped=len(messages) - len(kept))
            best = Fitted(kept, prompt, dropped)
            high = middle - 1
        else:
            low = middle + 1
    if best is None:
        shortest = _without(messages, units)
        floor = at_least(shortest)
        tokens = floor if floor > limits.prompt_budget else len(render(shortest))
        raise overflow_error(
            limits, tokens, " even with only the system messages and the last turn"
        )
    return best


async def summarize(
    messages: list[ChatMessage], render: Render, limits: Limits, options: SummaryOptions
) -> Fitted:
    """Replace all but the last `keep_messages` messages (and the system ones) with a summary."""
    units = droppable_units(messages)
    count = _units_to_summarize(messages, units, options.keep_messages)
    if count == 0:
        after = f" with nothing older than the last {options.keep_messages} messages to summarize"
        raise overflow_error(limits, len(render(messages)), after)
    replaced = sorted(index for unit in units[:count] for index in unit)
    floor = render(_without(messages, units[:count]))
    if len(floor) > limits.prompt_budget:  # no summary can help: don't spend a generation on it
        raise overflow_error(limits, len(floor), " even without the messages to summarize")
    max_tokens = max(1, min(options.max_tokens, limits.context_window // 4))
    request, unread = summary_request(
        [messages[index] for index in replaced],
        options.summarizer,
        limits.context_window - max_tokens,
    )
    summary = await options.summarizer.summarize(request, max_tokens)
    compacted = _with_summary(messages, replaced, summary.text)
    prompt = render(compacted)
    if len(prompt) > limits.prompt_budget:
        raise overflow_error(limits, len(prompt), " after summarizing the earlier messages")
    compaction = Compaction("summarize", summarized=len(replaced), unread=unread, summary=summary)
    return Fitted(compacted, prompt, compaction)


def _units_to_summarize(
    messages: Sequence[ChatMessage], units: Sequence[tuple[int, ...]], keep_messages: int
) -> int:
    """The most oldest units that leave at least `keep_messages` non-system messages."""
    remaining = sum(1 for message in messages if message.role not in PINNED_ROLES)
    count = 0
    for unit in units:
        if remaining - len(unit) < keep_messages:
            break
        remaining -= len(unit)
        count += 1
    return count


def summary_request(
    summarized: Sequence[ChatMessage], summarizer: Summarizer, budget_tokens: int
) -> tuple[list[int], int]:
    """The summary prompt's tokens, and how many messages it could hold only in part.

    A history longer than the window loses its oldest text: the prompt keeps the longest tail of
    the transcript that fits (a binary search over where the text starts).
    """
    lines = transcript_lines(list(summarized))
    transcript = "\n".join(lines)

    def prompt_from(start: int) -> list[int]:
        text = transcript if start == 0 else CUT_MARK + transcript[start:]
        return summarizer.prompt_tokens(summary_messages(text))

    whole = prompt_from(0)
    if len(whole) <= budget_tokens:
        return whole, 0
    start = _first_fitting_start(prompt_from, len(transcript), budget_tokens)
    line_starts = _line_starts(lines)
    return prompt_from(start), sum(1 for line_start in line_starts if line_start < start)


def _first_fitting_start(
    prompt_from: Callable[[int], list[int]], length: int, budget_tokens: int
) -> int:
    low = max(1, length - budget_tokens * MAX_CHARS_PER_TOKEN)
    high = length
    if len(prompt_from(high)) > budget_tokens:
        raise ContextLengthExceededError(
            "The context window is too small to summarize the earlier conversation.",
            param="messages",
        )
    while low < high:
        middle = (low + high) // 2
        if len(prompt_from(middle)) <= budget_tokens:
            high = middle
        else:
            low = middle + 1
    return low


def _line_starts(lines: Sequence[str]) -> list[int]:
    starts, offset = [], 0
    for line in lines:
        starts.append(offset)
        offset += len(line) + 1
    return starts


def summary_messages(transcript: str) -> list[ChatMessage]:
    return [
        ChatMessage(role="system", content=SUMMARY_INSTRUCTION),
        ChatMessage(role="user", content=transcript),
    ]


def _with_summary(
    messages: Sequence[ChatMessage], replaced: Sequence[int], text: str
) -> list[ChatMessage]:
    """The summary takes the place of the first replaced message; system messages stay put."""
    note = ChatMessage(role="system", content=f"{SUMMARY_LABEL}\n{text.strip()}")
    gone = set(replaced)
    compacted: list[ChatMessage] = []
    for index, message in enumerate(messages):
        if index == replaced[0]:
            compacted.append(note)
        if index not in gone:
            compacted.append(message)
    return compacted


@dataclass
class CompactionCounters:
    """Totals for /v1/mlx/status and /metrics; touched only on the event loop's thread."""

    policy: OverflowPolicy
    truncations: int = 0
    summaries: int = 0
    messages_dropped: int = 0
    messages_summarized: int = 0
    summary_tokens: int = 0
    refusals: int = 0  # compaction was asked for and could not make the request fit

    def record(self, compaction: Compaction | None) -> None:
        if compaction is None:
            return
        if compaction.policy == "truncate":
            self.truncations += 1
            self.messages_dropped += compaction.dropped
            return
        self.summaries += 1
        self.messages_summarized += compaction.summarized
        if compaction.summary is not None:
            summary = compaction.summary
            self.summary_tokens += summary.prompt_tokens + summary.completion_tokens

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "truncations": self.truncations,
            "summaries": self.summaries,
            "messages_dropped": self.messages_dropped,
            "messages_summarized": self.messages_summarized,
            "summary_tokens": self.summary_tokens,
            "refusals": self.refusals,
        }
