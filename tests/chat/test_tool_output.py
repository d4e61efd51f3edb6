"""Splitting raw model text into reasoning, content and tool calls; the forcing grammars.

The splitter is the one the server runs on every chat answer (streamed or whole); these tests
feed it text as the engine would, in pieces of every size.
"""

from __future__ import annotations

import json
from pathlib import Path

import llguidance
import llguidance.hf
import pytest
from transformers import AutoTokenizer

from mlx_engine_server.chat.output import (
    Content,
    OutputRules,
    OutputSplitter,
    ParsedOutput,
    ReasoningMarkers,
    split_whole,
    without_reasoning,
)
from mlx_engine_server.chat.parsers import OURS, known_tool_call_parsers, resolve_tool_call_format
from mlx_engine_server.chat.structured import json_schema_rule
from mlx_engine_server.chat.tool_fallback import TEXT_ANSWER
from mlx_engine_server.chat.tool_grammar import ThinkingShape, tool_call_grammar
from mlx_engine_server.chat.tools import ToolPolicy, ToolSpec

THINK = ReasoningMarkers("<think>", "</think>")
WEATHER = frozenset({"get_weather"})


def rules(family: str, **overrides: object) -> OutputRules:
    fields: dict[str, object] = {"reasoning": THINK, "tools": OURS[family], "offered": WEATHER}
    fields.update(overrides)
    return OutputRules(**fields)  # type: ignore[arg-type]


def split_in_pieces(rule: OutputRules, text: str, size: int) -> tuple[ParsedOutput, list[str]]:
    splitter = OutputSplitter(rule)
    output = ParsedOutput()
    content_deltas = []
    pieces = [text[start : start + size] for start in range(0, len(text), size)]
    for parts in [*(splitter.feed(piece) for piece in pieces), splitter.finish()]:
        content_deltas += [part.text for part in parts if isinstance(part, Content)]
        output.add(parts)
    return output, content_deltas


CASES = {
    "hermes": (
        '<think>Which city?</think>\n\nLet me look.\n<tool_call>\n{"name": "get_weather", '
        '"arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", '
        '"arguments": "{\\"city\\": \\"Rome\\"}"}\n</tool_call>',
        "Let me look.",
    ),
    "llama3": (
        '<think>Which city?</think> {"name": "get_weather", "parameters": {"city": "Paris"}}; '
        '{"name": "get_weather", "parameters": {"city": "Rome"}}',
        "",
    ),
    "mistral": (
        '<think>Which city?</think>Let me look.[TOOL_CALLS][{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}, {"name": "get_weather", "arguments": {"city": "Rome"}}]',
        "Let me look.",
    ),
    "gemma": (
        '<think>Which city?</think>Let me look.\n```tool_code\n[get_weather(city="Paris"), '
        'get_weather(city="Rome")]\n```',
        "Let me look.",
    ),
}


@pytest.mark.parametrize("family", sorted(CASES))
@pytest.mark.parametrize("size", [1, 2, 5, 1000])
def test_each_family_parses_calls_whatever_the_pieces(family: str, size: int) -> None:
    text, content = CASES[family]
    output, deltas = split_in_pieces(rules(family), text, size)
    assert output.reasoning == "Which city?"
    assert output.content == content
    assert [(call.index, call.name) for call in output.tool_calls] == [
        (0, "get_weather"),
        (1, "get_weather"),
    ]
    assert [json.loads(call.arguments) for call in output.tool_calls] == [
        {"city": "Paris"},
        {"city": "Rome"},
    ]
    assert all(call.id.startswith("call_") for call in output.tool_calls)
    assert not any(marker in "".join(deltas) for marker in ("<tool", "[TOOL", "```", "<think"))


@pytest.mark.parametrize(
    "text",
    [
        'Sure <tool_call>{"name": "get_weather", "arguments": {"city": ',  # cut off
        'Sure <tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>',  # not an object
        'Sure <tool_call>{"name": "delete_all", "arguments": {}}</tool_call>',  # not offered
        "Sure <tool_call>not json at all</tool_call>",
    ],
)
def test_malformed_or_unoffered_calls_are_plain_content(text: str) -> None:
    for size in (1, 3, 1000):
        output, _ = split_in_pieces(rules("hermes"), text, size)
        assert output.tool_calls == []
        assert output.content == text


def test_text_that_only_looks_like_a_marker_start_is_released() -> None:
    output, deltas = split_in_pieces(rules("hermes"), "a < b and <tool is <thin", 1)
    assert output.content == "a < b and <tool is <thin"
    assert "".join(deltas) == output.content


def test_parallel_false_keeps_the_first_call_only() -> None:
    text, _ = CASES["hermes"]
    output = split_whole(rules("hermes", parallel=False), text)
    assert [json.loads(call.arguments) for call in output.tool_calls] == [{"city": "Paris"}]


def test_generation_starting_inside_thinking_and_splitting_off() -> None:
    opened = split_whole(rules("hermes", starts_in_reasoning=True), "hmm, Paris</think>\n\nHi")
    assert (opened.reasoning, opened.content) == ("hmm, Paris", "Hi")
    kept = split_whole(rules("hermes", reasoning=None), "<think>hmm</think>Hi")
    assert (kept.reasoning, kept.content) == ("", "<think>hmm</think>Hi")


@pytest.mark.parametrize(
    ("text", "opened", "answer"),
    [
        ("hmm</think>\n\nThe summary.", True, "The summary."),  # the prompt opened <think>
        ("hmm, still thinking", True, ""),  # out of tokens before the reasoning ended
        ("<think>hmm</think>The summary.", False, "The summary."),
        ("hmm</think>The summary.", False, "The summary."),  # reasoned though thinking was off
        ("The summary.", False, "The summary."),
    ],
)
def test_a_summary_keeps_what_follows_the_reasoning(text: str, opened: bool, answer: str) -> None:
    assert without_reasoning(text, THINK, starts_in_reasoning=opened).strip() == answer


def test_without_tools_offered_markup_stays_content() -> None:
    text = '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>  '
    output = split_whole(OutputRules(reasoning=THINK), text)
    assert output.content == text
    assert output.tool_calls == []


def test_every_mlx_lm_parser_can_be_named() -> None:
    names = known_tool_call_parsers()
    assert {"auto", "none", "hermes", "llama3", "mistral", "gemma", "qwen3_coder"} <= set(names)
    qwen3_coder = resolve_tool_call_format("qwen3_coder", tokenizer=None)
    assert qwen3_coder is not None
    text = (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "</function>\n</tool_call>"
    )
    output = split_whole(OutputRules(tools=qwen3_coder, offered=WEATHER), text)
    assert [(call.name, json.loads(call.arguments)) for call in output.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]


# --- grammars for forced calls --------------------------------------------------------------

CITY = {
    "type": "object",
    "properties": {"city": {"$ref": "#/$defs/City"}},
    "required": ["city"],
    "additionalProperties": False,
    "$defs": {"City": {"type": "string", "enum": ["Paris", "Rome"]}},
}
TOOLS = (ToolSpec("get_weather", CITY), ToolSpec("get_time", {"type": "object"}))


@pytest.fixture(scope="module")
def ll_tokenizer(smollm_dir: Path) -> llguidance.LLTokenizer:
    return llguidance.hf.from_tokenizer(AutoTokenizer.from_pretrained(smollm_dir))


def accepts(tokenizer: llguidance.LLTokenizer, grammar: str, text: str) -> bool:
    matcher = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_lark(grammar))
    assert not matcher.is_error(), matcher.get_error()
    tokens = tokenizer.tokenize_str(text)
    return matcher.validate_tokens(tokens) == len(tokens) and (
        matcher.consume_tokens(tokens) and matcher.is_accepting()
    )


PARIS = '{"name": "get_weather", "%s": {"city": "Paris"}}'
BERLIN = '{"name": "get_weather", "%s": {"city": "Berlin"}}'


@pytest.mark.parametrize(
    ("family", "wrap", "key"),
    [
        ("hermes", "<tool_call>\n%s\n</tool_call>", "arguments"),
        ("llama3", "%s", "parameters"),
        ("mistral", "[TOOL_CALLS][%s]", "arguments"),
    ],
)
def test_forcing_grammar_accepts_only_schema_valid_calls(
    ll_tokenizer: llguidance.LLTokenizer, family: str, wrap: str, key: str
) -> None:
    grammar = tool_call_grammar(ToolPolicy(TOOLS, "required"), family)
    assert accepts(ll_tokenizer, grammar, wrap % (PARIS % key))
    assert not accepts(ll_tokenizer, grammar, wrap % (BERLIN % key))  # not in the enum
    assert not accepts(ll_tokenizer, grammar, "Sure! " + wrap % (PARIS % key))
    assert not accepts(ll_tokenizer, grammar, wrap % (PARIS % key).replace("get_w", "w"))


def test_named_choice_allows_that_function_only(ll_tokenizer: llguidance.LLTokenizer) -> None:
    policy = ToolPolicy(TOOLS, "named", "get_time", parallel=False)
    grammar = tool_call_grammar(policy, "hermes")
    time_call = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    assert accepts(ll_tokenizer, grammar, time_call)
    assert not accepts(ll_tokenizer, grammar, time_call + "\n" + time_call)
    assert not accepts(ll_tokenizer, grammar, f"<tool_call>\n{PARIS % 'arguments'}\n</tool_call>")


def test_parallel_calls_and_thinking_first(ll_tokenizer: llguidance.LLTokenizer) -> None:
    call = f"<tool_call>\n{PARIS % 'arguments'}\n</tool_call>"
    opened = ThinkingShape("<think>", "</think>", opened=True)
    grammar = tool_call_grammar(ToolPolicy(TOOLS, "required"), "hermes", thinking=opened)
    assert accepts(ll_tokenizer, grammar, "Paris, I think.</think>\n\n" + call + "\n" + call)
    optional = ThinkingShape("<think>", "</think>", opened=False)
    grammar = tool_call_grammar(ToolPolicy(TOOLS, "required"), "hermes", thinking=optional)
    assert accepts(ll_tokenizer, grammar, call)
    assert accepts(ll_tokenizer, grammar, "<think>hmm</think>\n" + call)


# --- calls beside another answer; the fallback format; calls cut off by max_tokens -----------

GENERIC_PARIS = '{"tool_calls": [%s]}' % (PARIS % "arguments")


def test_generic_grammar_forces_the_documented_object(ll_tokenizer: llguidance.LLTokenizer) -> None:
    grammar = tool_call_grammar(ToolPolicy(TOOLS, "required"), "generic")
    assert accepts(ll_tokenizer, grammar, GENERIC_PARIS)
    time_call = '{"name": "get_time", "arguments": {}}'
    two = f'{{"tool_calls": [{PARIS % "arguments"}, {time_call}]}}'
    assert accepts(ll_tokenizer, grammar, two)
    assert not accepts(ll_tokenizer, grammar, GENERIC_PARIS.replace("Paris", "Berlin"))
    single = tool_call_grammar(ToolPolicy(TOOLS, "required", parallel=False), "generic")
    assert not accepts(ll_tokenizer, single, two)


def test_auto_fallback_allows_text_or_a_call(ll_tokenizer: llguidance.LLTokenizer) -> None:
    grammar = tool_call_grammar(ToolPolicy(TOOLS), "generic", answer=TEXT_ANSWER)
    assert accepts(ll_tokenizer, grammar, GENERIC_PARIS)
    assert accepts(ll_tokenizer, grammar, "It is sunny {today}.")
    assert not accepts(ll_tokenizer, grammar, '{"tool_calls": [{"name": "nope", "arguments": {}}]}')


ANSWER_SCHEMA = {"type": "object", "properties": {"sky": {"enum": ["sunny"]}}, "required": ["sky"]}


@pytest.mark.parametrize(
    ("family", "call"),
    [("generic", GENERIC_PARIS), ("hermes", f"<tool_call>\n{PARIS % 'arguments'}\n</tool_call>")],
)
def test_a_call_or_the_response_formats_json(
    ll_tokenizer: llguidance.LLTokenizer, family: str, call: str
) -> None:
    answer = json_schema_rule(ANSWER_SCHEMA)
    grammar = tool_call_grammar(ToolPolicy(TOOLS), family, answer=answer)
    assert accepts(ll_tokenizer, grammar, call)
    assert accepts(ll_tokenizer, grammar, '{"sky":"sunny"}')
    assert not accepts(ll_tokenizer, grammar, '{"sky":"rainy"}')
    assert not accepts(ll_tokenizer, grammar, "It is sunny.")


def test_generic_answers_parse_into_calls_or_stay_content() -> None:
    generic = rules("generic", reasoning=None)
    output = split_whole(generic, GENERIC_PARIS)
    assert [(call.name, json.loads(call.arguments)) for call in output.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert output.content == ""
    for text in ("It is sunny.", '{"sky":"sunny"}'):
        output = split_whole(generic, text)
        assert (output.content, output.tool_calls) == (text, [])


HERMES_CUT = (
    'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    '\n<tool_call>\n{"name": "get_weather", "arguments":'
)


@pytest.mark.parametrize(
    ("family", "text", "content", "calls"),
    [
        ("hermes", HERMES_CUT, "Sure.", 1),
        ("hermes", '<tool_call>\n{"name": "get_', "", 0),
        ("generic", '{"tool_calls": [{"name": "get_weather", "argu', "", 0),
        ("generic", '{"tool_', "", 0),
        ("llama3", '{"name": "get_weather", "param', "", 0),
        ("generic", '{"sky": "sun', '{"sky": "sun', 0),  # a response_format's answer, cut
    ],
)
@pytest.mark.parametrize("size", [1, 7, 1000])
def test_a_call_cut_off_by_max_tokens_is_dropped_not_shown(
    family: str, text: str, content: str, calls: int, size: int
) -> None:
    splitter = OutputSplitter(rules(family, reasoning=None))
    output = ParsedOutput()
    for start in range(0, len(text), size):
        output.add(splitter.feed(text[start : start + size]))
    output.add(splitter.finish(cut_off=True))
    assert (output.content, len(output.tool_calls)) == (content, calls)
    # The same text ended by the model, not by max_tokens, is no call: it stays content.
    assert split_whole(rules(family, reasoning=None), text).content.endswith(text[-6:])
