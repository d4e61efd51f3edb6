"""A draft model for speculative decoding: loaded like the main model, and refused at start-up
unless its tokenizer speaks the same token ids."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from mlx_lm.tokenizer_utils import TokenizerWrapper

from ..errors import StartupError
from .loader import LoadedModel, ModelSource, load_model

logger = logging.getLogger(__name__)


def load_with_draft(source: ModelSource, draft_path: str | None) -> LoadedModel:
    """The main model, with the draft model's weights attached when `draft_path` is given."""
    loaded = load_model(source)
    if draft_path is None:
        return loaded
    if loaded.kind != "text":
        raise StartupError("--draft-model works with text models only")
    logger.info("loading the draft model")
    draft = load_model(replace(source, model_path=draft_path, adapter_path=None, model_id=None))
    if draft.kind != "text":
        raise StartupError(f"--draft-model {draft_path} is not a text model")
    check_same_tokenizer(loaded.tokenizer, draft.tokenizer, draft_path)
    return replace(loaded, draft_model=draft.model)


def check_same_tokenizer(main: TokenizerWrapper, draft: TokenizerWrapper, draft_path: str) -> None:
    """Same vocabulary size, the same id for every token, the same special tokens."""
    problem = tokenizer_difference(main, draft)
    if problem is not None:
        raise StartupError(
            f"--draft-model {draft_path} does not share the model's tokenizer ({problem}); "
            "a draft model must come from the same family"
        )


def tokenizer_difference(main: TokenizerWrapper, draft: TokenizerWrapper) -> str | None:
    main_vocab: dict[str, int] = main._tokenizer.get_vocab()
    draft_vocab: dict[str, int] = draft._tokenizer.get_vocab()
    if len(main_vocab) != len(draft_vocab):
        return f"{len(main_vocab)} tokens against {len(draft_vocab)}"
    for token, token_id in main_vocab.items():
        if draft_vocab.get(token) != token_id:
            return f"{token!r} is {token_id} against {draft_vocab.get(token)}"
    main_special, draft_special = _special_tokens(main), _special_tokens(draft)
    if main_special != draft_special:
        return f"special tokens {main_special} against {draft_special}"
    return None


def _special_tokens(tokenizer: TokenizerWrapper) -> dict[str, Any]:
    inner = tokenizer._tokenizer
    specials = {token: inner.convert_tokens_to_ids(token) for token in inner.all_special_tokens}
    return {"eos_token_ids": sorted(tokenizer.eos_token_ids), **specials}
