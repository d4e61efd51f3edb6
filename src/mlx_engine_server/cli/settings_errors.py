"""SettingsError: why settings were refused, as one readable line: each problem named by its
setting, the value as the user typed it, and never the value of a secret (an API key)."""

from __future__ import annotations

from pydantic import ValidationError
from pydantic_core import ErrorDetails

SECRET_FIELDS = frozenset({"api_keys"})


class SettingsError(Exception):
    """A setting is invalid; the message is one readable line per problem."""


def describe_problems(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        name = ".".join(str(part) for part in error["loc"]) or "settings"
        if error["type"] == "extra_forbidden":
            problems.append(f"{name}: unknown setting")
        elif error["loc"] and error["loc"][0] in SECRET_FIELDS:
            problems.append(f"{name}: {error['msg']}")  # never echo a key
        else:
            problems.append(f"{name}: {_problem(error)}")
    return "invalid settings: " + "; ".join(problems)


def _problem(error: ErrorDetails) -> str:
    """pydantic's message without its "Value error, " prefix, and the value as it was typed:
    a repeated flag arrives as a tuple, which the user never wrote."""
    message = error["msg"].removeprefix("Value error, ")
    value = error.get("input")
    items = value if isinstance(value, list | tuple) else [value]
    typed = [str(item) for item in items]
    if error["type"] == "value_error" and any(item in message for item in typed):
        return message  # our own validators name the value they refuse
    return f"{message} (got {', '.join(repr(item) for item in typed)})"
