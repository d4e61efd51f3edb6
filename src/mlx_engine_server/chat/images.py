"""The images of a chat request: found, checked against the model and the policy, then loaded.

Every check that needs no I/O runs over the whole request first (a text-only model, too many
images, an image outside a user message), so a refused request reads and fetches nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass

from ..errors import InvalidRequestError
from ..protocols.openai.types import ChatMessage, ImagePart
from .media import LoadedImage, MediaPolicy, load_image


@dataclass(frozen=True)
class ImageRef:
    param: str  # messages[2].content[1].image_url
    part: ImagePart


def image_refs(messages: list[ChatMessage]) -> list[ImageRef]:
    return [
        ImageRef(f"messages[{index}].content[{position}].image_url", part)
        for index, message in enumerate(messages)
        for position, part in message.image_parts()
    ]


def check_image_refs(
    refs: list[ImageRef], messages: list[ChatMessage], multimodal: bool, policy: MediaPolicy
) -> None:
    """The refusals that need nothing read: 400 naming the first part concerned."""
    if not refs:
        return
    if not multimodal:
        raise InvalidRequestError(
            "This model does not read images; send text only or serve a vision-language model.",
            param=refs[0].param,
            code="model_not_multimodal",
        )
    if len(refs) > policy.max_images:
        raise InvalidRequestError(
            f"At most {policy.max_images} images per request (got {len(refs)}).",
            param=refs[policy.max_images].param,
            code="too_many_images",
        )
    for index, message in enumerate(messages):
        if message.role != "user" and message.image_parts():
            position, _ = message.image_parts()[0]
            raise InvalidRequestError(
                f"Image parts are only allowed in user messages, not in a {message.role} one.",
                param=f"messages[{index}].content[{position}]",
            )


async def load_images(refs: list[ImageRef], policy: MediaPolicy) -> dict[int, LoadedImage]:
    """Each image, loaded off the event loop, by the identity of its part."""
    loaded = {}
    for ref in refs:
        loaded[id(ref.part)] = await asyncio.to_thread(
            load_image, ref.part.image_url.url, ref.param, policy
        )
    return loaded


def images_of(messages: list[ChatMessage], loaded: dict[int, LoadedImage]) -> list[LoadedImage]:
    """The images of `messages` (all or some of the request's), in prompt order."""
    return [loaded[id(part)] for message in messages for _, part in message.image_parts()]


def images_digest(images: list[LoadedImage]) -> str:
    """One name for these images in this order: the prefix cache keeps prompts apart by it."""
    combined = hashlib.sha256()
    for image in images:
        combined.update(bytes.fromhex(image.digest))
    return combined.hexdigest()
