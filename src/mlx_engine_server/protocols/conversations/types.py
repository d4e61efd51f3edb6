"""Conversations API request bodies, with OpenAI's field names and limits."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ..openai.types import WireModel
from ..responses.types import Metadata

MAX_ITEMS_AT_ONCE = 20


class ConversationCreate(Metadata):
    items: list[Any] | None = Field(default=None, max_length=MAX_ITEMS_AT_ONCE)


class ConversationUpdate(Metadata):
    pass


class ItemsCreate(WireModel):
    items: list[Any] = Field(min_length=1, max_length=MAX_ITEMS_AT_ONCE)
