"""The settings of images in requests: a part of `config.Settings`, which takes them as a base."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import NoDecode

from ..chat.media import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_FORMATS,
    ImageFormat,
)
from .setting_values import existing_dirs, lowercase_items, split_list


class MediaSettings(BaseModel):
    allowed_media_dir: Annotated[tuple[Path, ...], NoDecode] = Field(
        default=(),
        description="Directories image files may be read from (file:// URLs or paths); "
        "none: local files are refused.",
    )
    allow_remote_media: bool = Field(
        default=False,
        description="Fetch http(s) image URLs (public addresses only, no redirects).",
    )
    max_image_bytes: int = Field(
        default=DEFAULT_MAX_IMAGE_BYTES, ge=1, description="Largest image accepted, in bytes."
    )
    max_image_pixels: int = Field(
        default=DEFAULT_MAX_IMAGE_PIXELS,
        ge=1,
        description="Most pixels (width x height) of one image, checked before decoding.",
    )
    max_images_per_request: int = Field(
        default=8, ge=1, le=1024, description="Most images one request may hold."
    )
    image_formats: Annotated[tuple[ImageFormat, ...], NoDecode] = Field(
        default=IMAGE_FORMATS, min_length=1, description="Image formats accepted."
    )
    remote_media_timeout_s: float = Field(
        default=10.0, gt=0, le=300, description="Time limit of fetching one image URL."
    )

    @field_validator("allowed_media_dir", mode="before")
    @classmethod
    def _split_dirs(cls, value: Any) -> Any:
        return split_list(value)

    @field_validator("image_formats", mode="before")
    @classmethod
    def _lowercase_formats(cls, value: Any) -> Any:
        return lowercase_items(split_list(value))

    @field_validator("allowed_media_dir", mode="after")
    @classmethod
    def _existing_dirs(cls, value: tuple[Path, ...]) -> tuple[Path, ...]:
        return existing_dirs(value)
