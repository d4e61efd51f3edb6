"""Plain checks and conversions of setting values, used by the validators of `config.Settings`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def split_list(value: Any) -> Any:
    """A list setting given as text (environment, flag): a JSON list or comma-separated items."""
    if not isinstance(value, str):
        return value
    if value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return [item.strip() for item in value.split(",") if item.strip()]


def lowercase_items(value: Any) -> Any:
    """A list of names compared without case (image formats)."""
    if isinstance(value, list | tuple):
        return tuple(item.lower() if isinstance(item, str) else item for item in value)
    return value


def existing_dirs(value: tuple[Path, ...]) -> tuple[Path, ...]:
    """Directories that exist, as absolute paths with ~ expanded."""
    for directory in value:
        if not directory.expanduser().is_dir():
            raise ValueError(f"{directory} is not a directory")
    return tuple(directory.expanduser().resolve() for directory in value)
