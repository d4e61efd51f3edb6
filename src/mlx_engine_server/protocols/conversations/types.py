"""Conversations API request bodies, with OpenAI's field names and limits."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from ..openai.types import WireModel, refuse_unless

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 64, 512
MAX_ITEMS_AT_ONCE = 20


class Metadata(WireModel):
    metadata: dict[str, str] | None = None

    @field_validator("metadata", mode="after")
    @classmethod
    def _openai_limits(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        pairs = value or {}
        refuse_unless(len(pairs) <= MAX_METADATA_PAIRS, "at most 16 metadata pairs")
        refuse_unless(
            all(
                len(key) <= MAX_METADATA_KEY_CHARS and len(text) <= MAX_METADATA_VALUE_CHARS
                for key, text in pairs.items()
            ),
            "metadata keys have at most 64 characters, values at most 512",
        )
        return value


class ConversationCreate(Metadata):
    items: list[Any] | None = Field(default=None, max_length=MAX_ITEMS_AT_ONCE)


class ConversationUpdate(Metadata):
    pass


class ItemsCreate(WireModel):
    items: list[Any] = Field(min_length=1, max_length=MAX_ITEMS_AT_ONCE)
