"""The CPU work of the HTTP front (parsing big bodies, rendering chat templates, tokenizing) runs
off the event loop, and text that can never fit the context window is refused before any of it.

On the loop, a 10 MB /tokenize or an 8 MB chat held every other client (/health included) for as
long as it took: seconds to tens of seconds. In a thread it does not: HF's fast tokenizers
release the GIL while they encode, and Jinja, pure Python, yields it every switch interval
(measured: /health's slowest answer under such a request, benchmarks/loop_stall.py). A few
threads, so one big request leaves room for the others.

The cap: a token never covers more characters than the longest entry of the vocabulary (byte-
level and SentencePiece vocabularies spell every byte or character of a token), so text of more
than window x that many characters is over the window whatever the template adds. The check
counts characters only, so it refuses early without ever refusing a prompt that could fit.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

from ..errors import ContextLengthExceededError
from ..protocols.openai.types import ChatMessage

P = ParamSpec("P")
T = TypeVar("T")

FRONT_THREADS = min(4, os.cpu_count() or 1)
# Input normalization (NFKC composes some character pairs into one) may shrink text before it
# is tokenized: the margin keeps the bound a true lower bound.
NORMALIZATION_MARGIN = 2
# Roles whose text every chat template renders (assistant turns may lose their reasoning).
RENDERED_ROLES = frozenset({"system", "developer", "user"})

_threads = ThreadPoolExecutor(max_workers=FRONT_THREADS, thread_name_prefix="mlx-front")


async def off_loop(work: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`work(*args, **kwargs)` in one of the front's threads; the loop serves others meanwhile."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_threads, functools.partial(work, *args, **kwargs))


@functools.lru_cache(maxsize=8)
def longest_token_chars(tokenizer: Any) -> int:
    """Characters of the vocabulary's longest entry: the most text one token can stand for
    (with the margin); without a vocabulary to read, no bound at all."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if get_vocab is None:
        return sys.maxsize
    return max((len(token) for token in get_vocab()), default=1) * NORMALIZATION_MARGIN


def check_text_can_fit(tokenizer: Any, chars: int, context_window: int, param: str) -> None:
    """ContextLengthExceededError, from the character count alone, for text that surely leaves
    no room in the window; silent for anything that might fit."""
    at_least = chars // longest_token_chars(tokenizer)
    if at_least >= context_window:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {context_window} tokens. However, your "
            f"{param} alone holds at least {at_least} tokens ({chars} characters). Please reduce "
            "the prompt.",
            param=param,
        )


def tokens_at_least(tokenizer: Any) -> Callable[[list[ChatMessage]], int]:
    """The fewest tokens these messages can take once rendered, from their characters."""
    longest = longest_token_chars(tokenizer)
    return lambda messages: rendered_chars(messages) // longest


def rendered_chars(messages: Iterable[ChatMessage]) -> int:
    """Characters every chat template renders of these messages (their text parts)."""
    return sum(len(message.text()) for message in messages if message.role in RENDERED_ROLES)
