"""Log output: plain text or JSON lines on stderr, with control characters in values escaped.

A logged value may come from a client (a path, a request id, a prompt): escaping keeps one event
on one line, so nobody can forge log lines or drive a terminal with escape sequences.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import LogLevel, Settings

FIELDS_ATTRIBUTE = "fields"  # logger.info(..., extra={"fields": {...}})
# C0 and C1 controls, DEL, and the Unicode line and paragraph separators.
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_control(text: str) -> str:
    return CONTROL_CHARACTERS.sub(_escaped, text)


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"  # noqa: PLR2004


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, FIELDS_ATTRIBUTE, None)
    return fields if isinstance(fields, dict) else {}


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message key=value ...`; a traceback follows on its own lines."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_control(record.message)
        line = super().formatMessage(record)
        pairs = [f"{key}={_text_value(value)}" for key, value in record_fields(record).items()]
        return " ".join([line, *pairs])


def _text_value(value: Any) -> str:
    if value is None:
        return "-"
    text = escape_control(str(value))
    return json.dumps(text) if (" " in text or '"' in text or not text) else text


class JsonFormatter(logging.Formatter):
    """One JSON object a line; json.dumps escapes every control character."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **record_fields(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, log_format: str) -> None:
    """One handler on the root logger (stderr: stdout carries only the ready line)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


def effective_log_level(settings: Settings) -> LogLevel:
    """The level both processes log at: `quiet` raises info and debug to warning."""
    if settings.quiet and settings.log_level in ("info", "debug"):
        return "warning"
    return settings.log_level
