"""Client data stays data in a chat template: typed control-token text is never a control token.

Every string the client sent that reaches the template (message content and names, reasoning,
tool-call ids, names and arguments, tool names, descriptions and parameter schemas, keys as well
as values, template keyword arguments) and holds a special token's text, or ends with the start
of one (so two adjacent values cannot join into one), is wrapped in unguessable markers before
the template runs. Markers wrap the value rather than replace it, so a template that prints it
through `tojson` escapes it as usual. After rendering, the text between an opening and a closing
marker is tokenized with special-token matching off, the rest (the template's own markers) as
usual; the markers are removed. Other prompts tokenize exactly as before.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

# Private-use characters around a decimal nonce: JSON escaping (ensure_ascii off, as in
# transformers' `tojson`), HTML escaping and case filters leave them as they are.
MARK_START, MARK_END = "\ue000", "\ue001"
OPENING, CLOSING = "o", "c"


@dataclass(frozen=True)
class SpecialText:
    """The special tokens' texts, and every proper beginning of one that opens with punctuation."""

    pattern: re.Pattern[str]
    beginnings: frozenset[str]
    longest: int

    def in_text(self, text: str) -> bool:
        """`text` holds a special token, or ends with the start of one."""
        if self.pattern.search(text):
            return True
        tail = min(len(text), self.longest)
        return any(text[-size:] in self.beginnings for size in range(1, tail + 1))


@lru_cache(maxsize=8)
def special_text(specials: tuple[str, ...]) -> SpecialText | None:
    tokens = sorted({token for token in specials if token}, key=len, reverse=True)
    if not tokens:
        return None
    # Only tokens that open with punctuation (`<|`, `[`, `<`): the words a template compares
    # (roles, types, keys) never end with such a beginning, so they are never wrapped.
    beginnings = frozenset(
        token[:size]
        for token in tokens
        if not (token[0].isalnum() or token[0] == "_")
        for size in range(1, len(token))
    )
    pattern = re.compile("|".join(re.escape(token) for token in tokens))
    return SpecialText(pattern, beginnings, max(map(len, tokens)))


@dataclass(frozen=True)
class Segment:
    text: str
    data: bool  # client data: tokenized with special-token matching off


class DataShield:
    """Wraps a request's values for one rendering, then splits the rendered text again."""

    def __init__(self, specials: SpecialText | None) -> None:
        self._specials = specials
        nonce = "".join(secrets.choice("0123456789") for _ in range(20))
        self._open = f"{MARK_START}{nonce}{OPENING}{MARK_END}"
        self._close = f"{MARK_START}{nonce}{CLOSING}{MARK_END}"
        start, end = (
            f"(?:{re.escape(mark)}|{re.escape(ascii(mark)[1:-1])})"
            for mark in (MARK_START, MARK_END)
        )
        # Also as `tojson(ensure_ascii=True)` writes them, and after `|upper`.
        self._marker = re.compile(f"{start}{nonce}([{OPENING}{CLOSING}]){end}", re.IGNORECASE)
        self.used = False

    def wrap(self, value: Any) -> Any:
        """`value` with every string that holds special-token text wrapped, at any depth."""
        if self._specials is None:
            return value
        if isinstance(value, str):
            return self._wrap_text(value)
        if isinstance(value, dict):
            return {self.wrap(key): self.wrap(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self.wrap(item) for item in value]
        return value

    def _wrap_text(self, text: str) -> str:
        if self._specials is None or not self._specials.in_text(text):
            return text
        self.used = True
        return f"{self._open}{text}{self._close}"

    def segments(self, rendered: str) -> list[Segment]:
        """The rendered text cut into template text and client data, markers removed. An
        opening marker holds until the next closing one (a template that cut a value in two
        leaves the rest of it data, never template text)."""
        pieces = self._marker.split(rendered)
        segments: list[Segment] = []
        inside = False
        for index, piece in enumerate(pieces):
            if index % 2:  # re.split puts the captured marker kinds at the odd places
                inside = piece.lower() == OPENING
            elif piece and segments and segments[-1].data == inside:
                segments[-1] = Segment(segments[-1].text + piece, inside)
            elif piece:
                segments.append(Segment(piece, inside))
        return segments


def encode_segments(tokenizer: Any, segments: list[Segment]) -> list[int]:
    tokens: list[int] = []
    for segment in segments:
        if segment.data:
            tokens += tokenizer.encode(
                segment.text, add_special_tokens=False, split_special_tokens=True
            )
        else:
            tokens += tokenizer.encode(segment.text, add_special_tokens=False)
    return tokens
