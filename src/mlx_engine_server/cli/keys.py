"""API key files: one key a line, `#` comments, and optionally the key's own rate limits
(`KEY rpm=60 tpm=20000`). A key has no spaces, so a file of bare keys reads as before. Errors
name the line, never the key."""

from __future__ import annotations

from pathlib import Path

PRINTABLE_ASCII_FIRST, PRINTABLE_ASCII_LAST = 0x21, 0x7E


def read_api_key_file(path: Path) -> list[str]:
    return list(read_key_limits(path))


KeyLimits = dict[str, int]  # "rpm" and "tpm", when a key file line gives them
KEY_LIMIT_NAMES = frozenset({"rpm", "tpm"})


def read_key_limits(path: Path) -> dict[str, KeyLimits]:
    """Each key of the file with its own limits: `KEY`, or `KEY rpm=60 tpm=20000` (a key has
    no spaces, so files of bare keys read as before)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the API key file: {type(exc).__name__}") from None
    keys: dict[str, KeyLimits] = {}
    for number, line in enumerate(lines, start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            key, *options = line.split()
            check_api_key(key)
            keys[key] = _key_limits(options, number)
    if not keys:
        raise ValueError("the API key file holds no key")
    return keys


def _key_limits(options: list[str], line_number: int) -> KeyLimits:
    limits: KeyLimits = {}
    for option in options:
        name, _, value = option.partition("=")
        if name not in KEY_LIMIT_NAMES or not value.isdigit() or int(value) < 1:
            raise ValueError(
                f"API key file line {line_number}: after the key, only rpm=N and tpm=N "
                "(positive integers) may follow"
            )
        limits[name] = int(value)
    return limits


def check_api_key(key: str) -> None:
    """A key travels in an HTTP header: printable ASCII, no spaces (the message names no key)."""
    if not key or not all(
        PRINTABLE_ASCII_FIRST <= ord(char) <= PRINTABLE_ASCII_LAST for char in key
    ):
        raise ValueError("an API key must be printable ASCII characters without spaces")
