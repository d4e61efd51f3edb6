"""POST /tokenize and /detokenize in vLLM's shapes, so clients can count tokens before sending."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ...chat.plan import plan_chat
from ...chat.prompt import check_token_ids
from ...errors import InvalidRequestError
from ...http.body import read_model
from ...http.context import chat_formats_of
from ...pipeline.front_work import check_text_can_fit, off_loop, rendered_chars
from .tokenize_types import DetokenizeRequest, TokenizeRequest
from .types import ChatMessage


async def tokenize(request: Request) -> Response:
    body = await read_model(request, TokenizeRequest)
    engine = request.app.state.engine
    loaded = engine.model
    tokenizer = engine.tokenizer
    window = loaded.context_window
    if body.messages is not None:
        messages = list(body.messages)
        _refuse_images(messages)
        check_text_can_fit(tokenizer, rendered_chars(messages), window, "messages")
        # The prompt a chat request with these messages (tools, template arguments) gets: the
        # same plan, so a model whose template renders no tools counts its calls as the generic
        # fallback writes them.
        chat = body.chat_request()
        plan = await off_loop(plan_chat, tokenizer, chat_formats_of(request), chat)
        tokens = plan.prompt_tokens
    else:
        prompt = body.prompt or ""
        check_text_can_fit(tokenizer, len(prompt), window, "prompt")
        special = body.add_special_tokens
        tokens = await off_loop(tokenizer.encode, prompt, add_special_tokens=special)
    answer: dict[str, Any] = {
        "count": len(tokens),
        "max_model_len": loaded.context_window,
        "tokens": tokens,
    }
    if body.return_token_strs:
        answer["token_strs"] = await off_loop(tokenizer.convert_ids_to_tokens, tokens)
    return JSONResponse(answer)


def _refuse_images(messages: list[ChatMessage]) -> None:
    """Counting image tokens needs the images processed: /tokenize does not load them."""
    for index, message in enumerate(messages):
        for position, _ in message.image_parts():
            raise InvalidRequestError(
                "/tokenize counts text only; image parts are not loaded here.",
                param=f"messages[{index}].content[{position}]",
            )


async def detokenize(request: Request) -> Response:
    body = await read_model(request, DetokenizeRequest)
    tokenizer = request.app.state.engine.tokenizer
    check_token_ids(tokenizer, body.tokens, "tokens")
    return JSONResponse({"prompt": await off_loop(tokenizer.decode, body.tokens)})
