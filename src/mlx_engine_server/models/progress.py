"""Progress of the long start-up steps (hashing and converting a GGUF file): a tqdm bar when
stderr is a terminal, a plain log line every 10% otherwise, nothing when the logger is quiet
(`--quiet` raises the level to warning).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm

LINE_EVERY_PERCENT = 10
Advance = Callable[[int], None]


def describe_bytes(size_bytes: int) -> str:
    """`812 B`, `1.3 GB`: decimal units, as file managers and download pages show sizes."""
    if size_bytes < 1000:  # noqa: PLR2004
        return f"{size_bytes} B"
    size = float(size_bytes)
    for unit in ("KB", "MB", "GB"):
        size /= 1000
        if size < 1000:  # noqa: PLR2004
            return f"{size:.1f} {unit}"
    return f"{size / 1000:.1f} TB"


@contextmanager
def progress(logger: logging.Logger, what: str, total_bytes: int) -> Iterator[Advance]:
    """Yield `advance(done_bytes)`; show the bytes done of `total_bytes` while the block runs."""
    if not logger.isEnabledFor(logging.INFO) or total_bytes <= 0:
        yield _ignore
    elif sys.stderr.isatty():
        with tqdm(
            total=total_bytes, desc=what, unit="B", unit_scale=True, leave=False, file=sys.stderr
        ) as bar:
            yield bar.update
    else:
        yield _Lines(logger, what, total_bytes).advance


def _ignore(done_bytes: int) -> None:
    del done_bytes


class _Lines:
    """One INFO line each time another LINE_EVERY_PERCENT of the work is done."""

    def __init__(self, logger: logging.Logger, what: str, total_bytes: int) -> None:
        self._logger, self._what, self._total_bytes = logger, what, total_bytes
        self._done_bytes = 0
        self._shown_percent = 0

    def advance(self, done_bytes: int) -> None:
        self._done_bytes += done_bytes
        percent = self._done_bytes * 100 // self._total_bytes
        step = percent - percent % LINE_EVERY_PERCENT
        if step > self._shown_percent:
            self._shown_percent = step
            self._logger.info(
                "%s: %d%% (%s of %s)",
                self._what,
                step,
                describe_bytes(self._done_bytes),
                describe_bytes(self._total_bytes),
            )
