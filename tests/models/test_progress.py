"""Progress of hashing and conversion: a bar on a terminal, a line every 10% elsewhere, nothing
when the logger is quiet."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from mlx_engine_server.models.progress import describe_bytes, progress

logger = logging.getLogger("mlx_engine_server.models.test")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def advance_in_tenths(total_bytes: int) -> None:
    with progress(logger, "hashing m.gguf", total_bytes) as advance:
        for _ in range(10):
            advance(total_bytes // 10)


def test_sizes_read_as_people_write_them() -> None:
    assert describe_bytes(812) == "812 B"
    assert describe_bytes(98_400_000) == "98.4 MB"
    assert describe_bytes(4_370_000_000) == "4.4 GB"
    assert describe_bytes(2_000_000_000_000) == "2.0 TB"


def test_plain_lines_every_ten_percent(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=logger.name):
        advance_in_tenths(2000)
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 10
    assert messages[0] == "hashing m.gguf: 10% (200 B of 2.0 KB)"
    assert messages[-1] == "hashing m.gguf: 100% (2.0 KB of 2.0 KB)"


def test_a_bar_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with caplog.at_level(logging.INFO, logger=logger.name):
        advance_in_tenths(2000)
    assert "hashing m.gguf:" in terminal.getvalue()
    assert caplog.records == []  # the bar, not log lines


def test_nothing_when_quiet(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with caplog.at_level(logging.WARNING, logger=logger.name):
        advance_in_tenths(2000)
    assert terminal.getvalue() == ""
    assert caplog.records == []
