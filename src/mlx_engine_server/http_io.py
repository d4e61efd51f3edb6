"""Reading request bodies: size limit, JSON parsing we control, strict validation → 400s."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from .errors import InvalidRequestError, PayloadTooLargeError

MAX_BODY_BYTES = 32 * 1024 * 1024

ModelT = TypeVar("ModelT", bound=BaseModel)


async def read_model(request: Request, model: type[ModelT]) -> ModelT:
    data = await read_json_object(request)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None


async def read_json_object(request: Request) -> dict[str, Any]:
    raw = await _read_body(request)
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidRequestError("The JSON body is nested too deeply.") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(
            f"The body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequestError("The body must be a JSON object.", code="invalid_json")
    if _may_hold_surrogates(raw):
        _reject_lone_surrogates(data)
    return data


def _may_hold_surrogates(raw: bytes) -> bool:
    """Only an escape like \\ud800 can put a lone surrogate into parsed JSON text."""
    return b"\\ud" in raw.lower()


def _reject_lone_surrogates(data: dict[str, Any]) -> None:
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(
            "The body holds a lone UTF-16 surrogate escape; text must be valid Unicode.",
            code="invalid_unicode",
        ) from None


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large()
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large() -> PayloadTooLargeError:
    return PayloadTooLargeError(f"The request body is larger than {MAX_BODY_BYTES} bytes.")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _validation_error(exc: ValidationError) -> InvalidRequestError:
    # Of a union's failed branches, the deepest error says the most ("prompt[0] must be >= 0").
    # Of equally deep ones, a wrong type most likely comes from a union branch that does not apply.
    first = max(
        exc.errors(include_url=False),
        key=lambda error: (len(error["loc"]), not error["type"].endswith("_type")),
    )
    param = _param_name(first["loc"])
    message = first["msg"]
    if first["type"] == "missing":
        message = "Missing required parameter"
    detail = f"{message}: '{param}'" if param else message
    extra = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
    return InvalidRequestError(detail + extra, param=param or None)


def _param_name(loc: tuple[int | str, ...]) -> str:
    """pydantic's ('messages', 0, 'role') as OpenAI spells it: messages[0].role."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif _is_union_branch(part):
            continue
        else:
            name += f".{part}" if name else part
    return name


def _is_union_branch(part: str) -> bool:
    return part.startswith(
        ("list[", "dict[", "function-", "constrained-", "literal[", "tagged-union[")
    ) or part in {
        "str",
        "int",
        "float",
        "bool",
        "TextPart",
        "ImagePart",
        "NamedToolChoice",
    }
