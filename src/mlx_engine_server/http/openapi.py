"""GET /openapi.json: every route with its request and response schemas.

Request schemas come from the pydantic types the routes validate with; response schemas from the
types in openapi_responses.py, which mirror what the routes build (tests check both against
real responses).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import __version__
from ..protocols.anthropic.types import CountTokensRequest, MessagesRequest
from ..protocols.conversations.types import ConversationCreate, ConversationUpdate, ItemsCreate
from ..protocols.openai.tokenize_types import DetokenizeRequest, TokenizeRequest
from ..protocols.openai.types import ChatCompletionRequest, CompletionRequest
from ..protocols.responses.types import ResponsesRequest
from .openapi_responses import RESPONSE_MODELS

REF = "#/components/schemas/{model}"
# One server-sent event: its `data` is a JSON chunk or `[DONE]` (`: ping` comments are no events).
SSE_EVENT = {
    "type": "object",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
    "required": ["data"],
}


REQUEST_MODELS: list[type[BaseModel]] = [
    ConversationCreate,
    ConversationUpdate,
    ItemsCreate,
    ChatCompletionRequest,
    CompletionRequest,
    TokenizeRequest,
    DetokenizeRequest,
    MessagesRequest,
    CountTokensRequest,
    ResponsesRequest,
]


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": REF.format(model=name)}}}


def _post(
    request_model: str, answer: str, description: str, error: str = "ErrorBody"
) -> dict[str, Any]:
    return {
        "post": {
            "summary": description,
            "requestBody": {"required": True, "content": _json(request_model)},
            "responses": {
                "200": {"description": description, "content": _json(answer)},
                "default": {"description": "an error", "content": _json(error)},
            },
        }
    }


def _generation(
    request_model: str, answer: str, description: str, error: str = "ErrorBody"
) -> dict[str, Any]:
    """A POST that generates: its answer whole, or with `stream: true` server-sent events."""
    operation = _post(request_model, answer, description, error)
    ok = operation["post"]["responses"]["200"]
    ok["description"] = f"the {answer}, or with `stream: true` server-sent events"
    ok["content"]["text/event-stream"] = {"schema": SSE_EVENT}
    return operation


def _get(answer: str, description: str, **extra: Any) -> dict[str, Any]:
    return {
        "get": {
            "summary": description,
            "responses": {
                "200": {"description": description, "content": _json(answer)},
                "default": {"description": "an error", "content": _json("ErrorBody")},
            },
            **extra,
        }
    }


def _page(description: str, media_type: str, **extra: Any) -> dict[str, Any]:
    """A file for browsers (http/pages.py); public even when the server has API keys."""
    content = {media_type: {"schema": {"type": "string"}}}
    ok = {"description": description, "content": content}
    return {"get": {"summary": description, "security": [{}], "responses": {"200": ok}, **extra}}


def _pages() -> dict[str, Any]:
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    asset = _page("A script or style sheet of the pages", "text/plain", parameters=[name])
    asset["get"]["responses"]["default"] = {
        "description": "an error",
        "content": _json("ErrorBody"),
    }
    return {
        "/": _page("The status page, with a chat box", "text/html"),
        "/docs": _page("This API reference, drawn from /openapi.json", "text/html"),
        "/static/{name}": asset,
    }


def _paths() -> dict[str, Any]:
    model_id = {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}
    health = _get("Health", "200 while serving")
    health["get"]["responses"]["503"] = {"description": "not serving", "content": _json("Health")}
    text = {"text/plain": {"schema": {"type": "string"}}}
    return {
        "/v1/chat/completions": _generation("ChatCompletionRequest", "ChatCompletion", "Chat"),
        "/v1/completions": _generation("CompletionRequest", "Completion", "Text completion"),
        "/v1/responses": _generation("ResponsesRequest", "ResponseObject", "OpenAI Responses"),
        "/v1/messages": _generation(
            "MessagesRequest", "AnthropicMessage", "Anthropic Messages", "AnthropicErrorBody"
        ),
        "/v1/messages/count_tokens": _post(
            "CountTokensRequest", "TokenCount", "Anthropic token count", "AnthropicErrorBody"
        ),
        "/tokenize": _post("TokenizeRequest", "TokenizeResult", "Text or messages to tokens"),
        "/detokenize": _post("DetokenizeRequest", "DetokenizeResult", "Tokens to text"),
        "/v1/models": _get("ModelList", "The served model"),
        "/v1/models/{model_id}": _get("ModelCard", "One model", parameters=[model_id]),
        "/v1/mlx/status": _get("Status", "Model, device, load and counters"),
        "/health": health,
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {"200": {"description": "text format", "content": text}},
            }
        },
        **_stored_paths(),
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "default": {"description": "an error", "content": _json("ErrorBody")},
                },
            }
        },
        **_pages(),
    }


def _path_parameters(*names: str) -> list[dict[str, Any]]:
    return [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in names
    ]


def _list_parameters() -> list[dict[str, Any]]:
    limit = {"type": "integer", "minimum": 1, "maximum": 100}
    order = {"type": "string", "enum": ["asc", "desc"]}
    return [
        {"name": "limit", "in": "query", "required": False, "schema": limit},
        {"name": "order", "in": "query", "required": False, "schema": order},
        {"name": "after", "in": "query", "required": False, "schema": {"type": "string"}},
    ]


def _delete(answer: str, description: str) -> dict[str, Any]:
    return {"delete": _get(answer, description)["get"]}


def _stored_paths() -> dict[str, Any]:
    """Stored responses, conversations and sessions (state/): each under its path's ids."""
    response = _path_parameters("response_id")
    conversation = _path_parameters("conversation_id")
    item = _path_parameters("conversation_id", "item_id")
    session = _path_parameters("session_id")
    paths: dict[str, Any] = {
        "/v1/responses/{response_id}": {
            **_get("ResponseObject", "A stored response"),
            **_delete("Deleted", "Delete a stored response"),
        },
        "/v1/responses/{response_id}/input_items": _get(
            "ItemList", "A stored response's input items", parameters=response + _list_parameters()
        ),
        "/v1/conversations": _post("ConversationCreate", "ConversationObject", "New conversation"),
        "/v1/conversations/{conversation_id}": {
            **_get("ConversationObject", "A conversation"),
            **_post("ConversationUpdate", "ConversationObject", "Replace its metadata"),
            **_delete("Deleted", "Delete a conversation"),
        },
        "/v1/conversations/{conversation_id}/items": {
            **_get("ItemList", "Its items", parameters=_list_parameters()),
            **_post("ItemsCreate", "ItemList", "Add items"),
        },
        "/v1/conversations/{conversation_id}/items/{item_id}": {
            **_get("StoredItem", "One item"),
            **_delete("ConversationObject", "Delete one item"),
        },
        "/v1/sessions/{session_id}": {
            **_get("SessionObject", "A session's messages"),
            **_delete("Deleted", "Forget a session"),
        },
    }
    shared = {
        "/v1/responses/{response_id}": response,
        "/v1/conversations/{conversation_id}": conversation,
        "/v1/conversations/{conversation_id}/items": conversation,
        "/v1/conversations/{conversation_id}/items/{item_id}": item,
        "/v1/sessions/{session_id}": session,
    }
    for path, parameters in shared.items():
        for operation in paths[path].values():
            operation["parameters"] = parameters + operation.get("parameters", [])
    return paths


def openapi_document() -> dict[str, Any]:
    models: list[tuple[type[BaseModel], JsonSchemaMode]] = [
        (model, "validation") for model in REQUEST_MODELS
    ]
    models += [(model, "serialization") for model in RESPONSE_MODELS]
    _, schemas = models_json_schema(models, ref_template=REF)
    bearer = {"type": "http", "scheme": "bearer"}
    header_key = {"type": "apiKey", "in": "header", "name": "x-api-key"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "mlx-engine-server", "version": __version__},
        "paths": _paths(),
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {"bearer": bearer, "apiKeyHeader": header_key},
        },
        # Keys are optional (--api-key); with keys, all but /health need one.
        "security": [{}, {"bearer": []}, {"apiKeyHeader": []}],
    }


async def openapi_json(request: Request) -> Response:
    document = getattr(request.app.state, "openapi", None)
    if document is None:
        document = request.app.state.openapi = openapi_document()
    root_path = request.scope.get("root_path", "")
    if root_path:  # behind a proxy's prefix (--root-path), clients call the API under it
        document = {**document, "servers": [{"url": root_path}]}
    return JSONResponse(document)
