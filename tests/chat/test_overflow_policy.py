"""The context-overflow policy as pure functions: which messages go, which stay, what is counted.

Tokens here are words (plus a few per message), so every expectation can be worked out by hand;
tests/test_overflow_http.py runs the same policy through the real template, tokenizer and engine.
"""

from __future__ import annotations

import asyncio

import pytest

from mlx_engine_server.chat.overflow import (
    CUT_MARK,
    SUMMARY_LABEL,
    Limits,
    Summary,
    SummaryOptions,
    droppable_units,
    fit_conversation,
    fit_without_model,
    summary_request,
)
from mlx_engine_server.errors import ContextLengthExceededError
from mlx_engine_server.protocols.openai.types import ChatMessage

PER_MESSAGE_TOKENS = 3


def message(role: str, words: int = 1, tag: str = "") -> ChatMessage:
    content = " ".join([tag or role, *["w"] * (words - 1)])
    return ChatMessage(role=role, content=content)  # type: ignore[arg-type]


def word_tokens(messages: list[ChatMessage]) -> list[int]:
    """A stand-in tokenizer: one token per word and a few per message."""
    count = sum(len(m.text().split()) + PER_MESSAGE_TOKENS for m in messages)
    return list(range(count))


class WordSummarizer:
    """Summaries of a fixed length, so the arithmetic stays visible."""

    def __init__(self, summary_words: int = 3) -> None:
        self.summary_words = summary_words
        self.requests: list[list[int]] = []
        self.last_prompt: list[ChatMessage] = []

    def prompt_tokens(self, messages: list[ChatMessage]) -> list[int]:
        self.last_prompt = messages
        return word_tokens(messages)

    async def summarize(self, prompt_tokens: list[int], max_tokens: int) -> Summary:
        self.requests.append(prompt_tokens)
        words = min(self.summary_words, max_tokens)
        return Summary(" ".join(["gist"] * words), len(prompt_tokens), words)


def fit(
    messages: list[ChatMessage],
    policy: str,
    *,
    window: int = 100,
    answer: int = 10,
    keep: int = 2,
    summarizer: WordSummarizer | None = None,
) -> tuple[list[ChatMessage], str | None, Summary | None]:
    limits = Limits(window, answer, max_tokens_requested=True)
    options = SummaryOptions(keep, 8, summarizer or WordSummarizer())
    fitted = asyncio.run(
        fit_conversation(messages, word_tokens, limits, policy, options)  # type: ignore[arg-type]
    )
    compaction = fitted.compaction
    assert fitted.prompt == word_tokens(fitted.messages)
    header = compaction.header_value() if compaction else None
    return fitted.messages, header, compaction.summary if compaction else None


def tags(messages: list[ChatMessage]) -> list[str]:
    return [m.text().split()[0] for m in messages]


def chat_of(turns: int, words: int = 10) -> list[ChatMessage]:
    """A system message, then user/assistant turns, ending with a user message."""
    messages = [message("system", 5, "sys")]
    for turn in range(turns):
        messages.append(message("user", words, f"u{turn}"))
        messages.append(message("assistant", words, f"a{turn}"))
    messages.append(message("user", words, "last"))
    return messages


# --- which messages may go together -----------------------------------------------------------


def test_units_are_whole_turns_and_keep_tool_results_with_their_call() -> None:
    roles = ["system", "user", "assistant", "user", "assistant", "tool", "tool", "assistant"]
    messages = [message(role) for role in [*roles, "user"]]
    assert droppable_units(messages) == [(1, 2), (3, 4, 5, 6, 7)]


def test_an_agent_loop_after_the_last_user_message_drops_call_and_results_together() -> None:
    roles = ["system", "user", "assistant", "tool", "assistant", "tool", "tool", "assistant"]
    messages = [message(role) for role in roles]
    # The user message and the newest exchange always stay.
    assert droppable_units(messages) == [(2, 3), (4, 5, 6)]


def test_system_messages_anywhere_are_never_dropped() -> None:
    roles = ["user", "assistant", "developer", "user", "system", "assistant", "user"]
    messages = [message(role) for role in roles]
    units = droppable_units(messages)
    assert units == [(0, 1), (3, 5)]
    assert all(messages[i].role not in ("system", "developer") for unit in units for i in unit)


def test_without_a_user_message_only_the_newest_exchange_must_stay() -> None:
    messages = [message("system"), message("assistant"), message("assistant")]
    assert droppable_units(messages) == [(1,)]


# --- truncate ---------------------------------------------------------------------------------


def test_truncate_leaves_a_conversation_that_fits_alone() -> None:
    messages = chat_of(2)
    kept, header, _ = fit(messages, "truncate")
    assert kept == messages
    assert header is None


def test_truncate_drops_the_fewest_oldest_turns() -> None:
    messages = chat_of(6)  # 8 + 13 * 13 = 177 tokens; 90 may stay
    kept, header, _ = fit(messages, "truncate")
    assert tags(kept) == ["sys", "u4", "a4", "u5", "a5", "last"]
    assert len(word_tokens(kept)) == 73  # one more turn would make 99
    assert header == "truncate; dropped=8"


def test_truncate_overflowing_by_one_message_drops_one_turn() -> None:
    messages = chat_of(3)  # 8 + 7 * 13 = 99 tokens, the budget is 90
    kept, header, _ = fit(messages, "truncate")
    assert tags(kept) == ["sys", "u1", "a1", "u2", "a2", "last"]
    assert header == "truncate; dropped=2"


def test_truncate_refuses_when_system_and_last_message_do_not_fit() -> None:
    messages = [message("system", 50, "sys"), message("user", 10), message("user", 45, "last")]
    with pytest.raises(ContextLengthExceededError) as caught:
        fit(messages, "truncate")
    error = caught.value
    assert error.param == "max_tokens"
    assert "maximum context length is 100 tokens" in error.message
    assert "101 in the prompt even with only the system messages and the last turn" in (
        error.message
    )
    assert "10 for the completion" in error.message


def test_truncate_refuses_at_once_when_max_tokens_alone_fills_the_window() -> None:
    with pytest.raises(ContextLengthExceededError):
        fit(chat_of(1), "truncate", answer=100)


def test_error_policy_changes_nothing() -> None:
    messages = chat_of(6)
    kept, header, _ = fit(messages, "error")
    assert kept == messages
    assert header is None


# --- summarize --------------------------------------------------------------------------------


def test_summarize_replaces_all_but_the_last_messages_with_one_system_message() -> None:
    summarizer = WordSummarizer(summary_words=3)
    messages = chat_of(6)
    kept, header, summary = fit(
        messages, "summarize", window=200, answer=100, keep=3, summarizer=summarizer
    )
    assert tags(kept) == ["sys", SUMMARY_LABEL.split()[0], "u5", "a5", "last"]
    assert kept[1].role == "system"
    assert kept[1].text() == f"{SUMMARY_LABEL}\ngist gist gist"
    assert header == "summarize; summarized=10"
    assert summary is not None
    assert summary.completion_tokens == 3
    (request,) = summarizer.requests
    assert summary.prompt_tokens == len(request)


def test_summarize_keeps_a_tool_result_with_its_call() -> None:
    roles = ["system", "user", "assistant", "tool", "assistant", "tool", "assistant", "tool"]
    # 13 words each: the transcript writes each tool result in the fallback's JSON (longer).
    messages = [message(role, 13, f"{role}{i}") for i, role in enumerate(roles)]
    kept, header, _ = fit(messages, "summarize", keep=1)
    # keep=1 would cut between assistant6 and tool7: the pair stays together.
    assert tags(kept) == ["system0", "user1", SUMMARY_LABEL.split()[0], "assistant6", "tool7"]
    assert header == "summarize; summarized=4"


def test_summarize_refuses_when_nothing_is_old_enough() -> None:
    messages = [message("system", 5), message("user", 60), message("assistant", 60)]
    with pytest.raises(ContextLengthExceededError, match="nothing older than the last 2"):
        fit(messages, "summarize", keep=2)


def test_summarize_refuses_without_generating_when_the_kept_part_cannot_fit() -> None:
    summarizer = WordSummarizer()
    messages = [message("user", 10), message("assistant", 10), message("user", 95, "last")]
    with pytest.raises(ContextLengthExceededError, match="even without the messages"):
        fit(messages, "summarize", keep=1, summarizer=summarizer)
    assert summarizer.requests == []


def test_summarize_refuses_when_the_summary_itself_is_too_long() -> None:
    messages = chat_of(3, words=12)  # 8 + 7 * 15 = 113 tokens; without the old ones 8 + 30
    # The old turns go (23 tokens left), but an 8-word summary takes 16 of the 30 available.
    with pytest.raises(ContextLengthExceededError, match="after summarizing"):
        fit(messages, "summarize", keep=1, window=40, answer=10, summarizer=WordSummarizer(15))


def test_a_history_longer_than_the_window_is_summarized_from_its_newest_part() -> None:
    summarized = [message("user", 30, f"old{i}") for i in range(10)]
    summarizer = WordSummarizer()
    request, unread = summary_request(summarized, summarizer, budget_tokens=80)
    assert 75 < len(request) <= 80
    # 24 tokens of instruction, 4 + 52 of transcript: the last line (31 words) and part of the
    # one before; the nine older lines were not read in full.
    assert unread == 9
    transcript = summarizer.last_prompt[-1].text()
    assert transcript.startswith(CUT_MARK)
    assert transcript.endswith(summarized[-1].text())


def test_the_summary_prompt_always_fits_the_window() -> None:
    summarizer = WordSummarizer()
    messages = chat_of(40)  # 1000+ tokens of history, a 100-token window
    kept, header, summary = fit(messages, "summarize", summarizer=summarizer)
    assert summary is not None
    assert summary.prompt_tokens <= 100 - 8
    assert header is not None
    assert header.startswith("summarize; summarized=78; unread=")
    assert len(word_tokens(kept)) <= 90


def test_truncate_renders_no_candidate_its_floor_puts_over_the_budget() -> None:
    """A floor from characters spares the search the renders of long candidates: an 8 MB chat
    would otherwise be rendered whole, then half of it, and so on."""
    messages = [message("system", 2)]
    for turn in range(1024):
        messages += [message("user", 10, f"q{turn}"), message("assistant", 10, f"a{turn}")]
    messages.append(message("user", 3, "last"))
    rendered: list[int] = []

    def counted(kept: list[ChatMessage]) -> list[int]:
        rendered.append(len(kept))
        return word_tokens(kept)

    def floor(kept: list[ChatMessage]) -> int:
        return sum(len(m.text().split()) for m in kept)  # never above word_tokens

    limits = Limits(100, 10, max_tokens_requested=True)
    fitted = fit_without_model(messages, counted, limits, "truncate", floor)
    assert fitted is not None
    assert fitted.messages == fit(messages, "truncate")[0]  # what the plain search keeps
    assert max(rendered) <= 2 * len(fitted.messages)
