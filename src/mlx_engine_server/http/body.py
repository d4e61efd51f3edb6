"""Reading request bodies: content type, size limit, JSON parsing we control, strict validation
→ 4xx."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from ..errors import InvalidRequestError, PayloadTooLargeError, UnsupportedMediaTypeError
from ..pipeline.front_work import off_loop
from ..protocols.openai.limits import RequestLimits, check_json_depth

ModelT = TypeVar("ModelT", bound=BaseModel)
# Bodies from this size on are parsed and validated in a front thread, not on the event loop.
OFF_LOOP_BYTES = 256 * 1024


async def read_model(request: Request, model: type[ModelT]) -> ModelT:
    raw = await _read_json_body(request)
    limits = request_limits(request)
    if not raw.strip() and _all_optional(model):
        raw = b"{}"  # as on OpenAI: a route whose fields are all optional takes no body at all
    if len(raw) < OFF_LOOP_BYTES:
        return _parse_and_validate(raw, limits, model)
    return await off_loop(_parse_and_validate, raw, limits, model)


def _parse_and_validate(raw: bytes, limits: RequestLimits, model: type[ModelT]) -> ModelT:
    return validate_model(model, parse_json_object(raw, limits))


def validate_model(model: type[ModelT], data: dict[str, Any]) -> ModelT:
    """`data` as `model`, or a 400 naming the first parameter at fault."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc, data) from None


def _all_optional(model: type[BaseModel]) -> bool:
    return not any(field.is_required() for field in model.model_fields.values())


def request_limits(request: Request) -> RequestLimits:
    limits: RequestLimits = request.app.state.limits
    return limits


async def _read_json_body(request: Request) -> bytes:
    _check_content_type(request.headers.get("content-type"))
    return await _read_body(request, request_limits(request).max_body_bytes)


def parse_json_object(raw: bytes, limits: RequestLimits) -> dict[str, Any]:
    """The body as a JSON object within the limits, or a 400 saying what is wrong with it."""
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidRequestError(
            "The JSON body is nested too deeply.", code="nesting_too_deep"
        ) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(
            f"The body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(data, dict):
        raise InvalidRequestError("The body must be a JSON object.", code="invalid_json")
    check_json_depth(data, limits.max_json_depth, raw)
    if _may_hold_surrogates(raw):
        _reject_lone_surrogates(data)
    return data


def _check_content_type(value: str | None) -> None:
    """JSON, or no type at all; anything else is a 415. A web page can send text/plain or a form
    to another origin without asking first, never application/json."""
    if value is None:
        return
    media_type = value.partition(";")[0].strip().lower()
    if media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        return
    raise UnsupportedMediaTypeError(
        f"Content-Type {media_type or value!r} is not accepted: send the body as JSON with "
        "'Content-Type: application/json'."
    )


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


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """Refuse by Content-Length before reading; count a chunked body as it arrives."""
    if _declared_length(request.headers.get("content-length", "")) > max_bytes:
        raise _too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


MAX_LENGTH_DIGITS = 18  # an exabyte: past every limit, and int() never reads a huge string


def _declared_length(header: str) -> int:
    """Content-Length as a number; 0 unless ASCII digits (the body is then counted as read).
    `str.isdigit` alone takes "²", which `int` refuses."""
    if not (header.isascii() and header.isdigit()):
        return 0
    return int(header) if len(header) <= MAX_LENGTH_DIGITS else 2**63


def _too_large(max_bytes: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"The request body is larger than {max_bytes} bytes.")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _validation_error(exc: ValidationError, data: dict[str, Any]) -> InvalidRequestError:
    # Of a union's failed branches, the deepest error says the most ("prompt[0] must be >= 0").
    # Of equally deep ones, a wrong type most likely comes from a union branch that does not apply.
    first = max(
        exc.errors(include_url=False),
        key=lambda error: (len(error["loc"]), not error["type"].endswith("_type")),
    )
    param = _param_name(first["loc"], data)
    message = first["msg"]
    if first["type"] == "missing":
        message = "Missing required parameter"
    detail = f"{message}: '{param}'" if param else message
    extra = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
    return InvalidRequestError(detail + extra, param=param or None)


def _param_name(loc: tuple[int | str, ...], data: Any) -> str:
    """pydantic's ('messages', 0, 'role') as OpenAI spells it: messages[0].role.

    `data` is followed along: a step that is the tag of a tagged union (`input[0].message`, the
    item's `type`) is pydantic's, not the client's, and is left out.
    """
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
            data = data[part] if isinstance(data, list) and 0 <= part < len(data) else None
        elif _is_union_branch(part) or _is_tag(data, part):
            continue
        else:
            name += f".{part}" if name else part
            data = data.get(part) if isinstance(data, dict) else None
    return name


def _is_tag(data: Any, part: str) -> bool:
    return isinstance(data, dict) and part not in data and part == data.get("type", "message")


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
        "FunctionChoice",
    }
