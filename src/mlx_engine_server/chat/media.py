"""Images from clients, safely: data URIs always; files and URLs only where the operator allows.

`load_image(url, param, policy)` is the one entry point (chat completions and the other chat
protocols use it): it checks the source against the policy before anything is read or fetched,
reads at most `max_image_bytes`, checks the format and the pixel count from the header before
decoding, and answers a validated RGB image with a digest of its bytes. Every refusal is an
InvalidRequestError naming `param`. Blocking (file and network I/O, decoding): call it from a
worker thread, not the event loop.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import http.client
import io
import ipaddress
import os
import socket
import ssl
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InvalidRequestError

ImageFormat = Literal["png", "jpeg", "webp", "gif"]
IMAGE_FORMATS: tuple[ImageFormat, ...] = ("png", "jpeg", "webp", "gif")
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 25_000_000
HTTP_PORTS = {"http": 80, "https": 443}

# Pillow warns about a decompression bomb between its limit and twice that, and raises above.
# We set the limit to ours and make the warning an error, so both end as a 400.
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


@dataclass(frozen=True)
class MediaPolicy:
    """Where images may come from and how big they may be (from the settings)."""

    allowed_dirs: tuple[Path, ...] = ()
    allow_remote: bool = False
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_images: int = 8
    formats: tuple[str, ...] = IMAGE_FORMATS  # lower-case Pillow format names
    remote_timeout_s: float = 10.0
    # Resolved once: symlinks in the configured directories themselves are the operator's choice.
    real_dirs: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        real = tuple(os.path.realpath(directory) for directory in self.allowed_dirs)
        object.__setattr__(self, "real_dirs", real)


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image  # RGB, decoded (a GIF's first frame)
    digest: str  # SHA-256 of the bytes as received
    format: str


def load_image(url: str, param: str, policy: MediaPolicy) -> LoadedImage:
    """The image at `url` (data URI, file or http(s) URL), or a 400 naming `param`."""
    return decode_image(read_image_bytes(url, param, policy), param, policy)


def read_image_bytes(url: str, param: str, policy: MediaPolicy) -> bytes:
    """The raw bytes behind `url`, after the policy allowed the source (checked first)."""
    if url.startswith("data:"):
        return _data_uri_bytes(url, param, policy)
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme in HTTP_PORTS:
        return _fetch_remote(url, param, policy)
    if scheme == "file" or url.startswith("/"):
        return _read_local_file(url, param, policy)
    raise _refuse("image_url.url must be a data: URI, an http(s):// URL or a file:// URL", param)


def _refuse(message: str, param: str, code: str = "invalid_image_url") -> InvalidRequestError:
    return InvalidRequestError(message, param=param, code=code)


# --- data URIs -----------------------------------------------------------------------------


def _data_uri_bytes(url: str, param: str, policy: MediaPolicy) -> bytes:
    header, comma, payload = url.partition(",")
    media_type, _, encoding = header.removeprefix("data:").partition(";")
    if not comma or encoding.lower() != "base64":
        raise _refuse("a data URI must look like data:image/png;base64,<data>", param)
    subtype = media_type.lower().removeprefix("image/")
    if not media_type.lower().startswith("image/") or _format_name(subtype) not in policy.formats:
        raise _refuse(
            f"unsupported image type {media_type!r}; allowed: {_allowed(policy)}",
            param,
            code="invalid_image_format",
        )
    if len(payload) > (policy.max_image_bytes + 2) // 3 * 4 + 4:
        raise _too_big(param, policy)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _refuse("the data URI is not valid base64", param, code="invalid_base64") from None
    if len(data) > policy.max_image_bytes:
        raise _too_big(param, policy)
    return data


def _format_name(subtype: str) -> str:
    return {"jpg": "jpeg", "pjpeg": "jpeg"}.get(subtype, subtype)


def _allowed(policy: MediaPolicy) -> str:
    return ", ".join(name.upper() for name in policy.formats)


def _too_big(param: str, policy: MediaPolicy) -> InvalidRequestError:
    return _refuse(
        f"the image is larger than {policy.max_image_bytes} bytes", param, code="image_too_large"
    )


# --- local files ---------------------------------------------------------------------------


def _read_local_file(url: str, param: str, policy: MediaPolicy) -> bytes:
    if not policy.real_dirs:
        raise _refuse(
            "local image files are not enabled on this server "
            "(the operator can allow directories with --allowed-media-dir)",
            param,
        )
    path = _local_path(url, param)
    real = os.path.realpath(path)
    if not any(_is_within(real, directory) for directory in policy.real_dirs):
        raise _refuse("the image file is outside the directories this server allows", param)
    return _read_regular_file(real, param, policy)


def _local_path(url: str, param: str) -> str:
    if not url.startswith("file:"):
        return url
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise _refuse("a file:// URL must name a local absolute path", param)
    path = unquote(parts.path)
    if "\x00" in path or not path.startswith("/"):
        raise _refuse("a file:// URL must name a local absolute path", param)
    return path


def _is_within(real_path: str, real_dir: str) -> bool:
    return real_path != real_dir and os.path.commonpath([real_path, real_dir]) == real_dir


def _read_regular_file(real: str, param: str, policy: MediaPolicy) -> bytes:
    """Read a regular file (not a FIFO or device) up to the byte limit, never following a link."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(real, flags)
    except OSError:
        raise _refuse("the image file cannot be read", param) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _refuse("the image path is not a regular file", param)
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(policy.max_image_bytes + 1)
    if len(data) > policy.max_image_bytes:
        raise _too_big(param, policy)
    return data


# --- remote URLs ---------------------------------------------------------------------------


def _fetch_remote(url: str, param: str, policy: MediaPolicy) -> bytes:
    if not policy.allow_remote:
        raise _refuse(
            "image URLs are not fetched by this server (the operator can allow it with "
            "--allow-remote-media); send the image as a data URI",
            param,
        )
    parts = urlsplit(url)
    host = parts.hostname
    if not host or parts.username or parts.password:
        raise _refuse("the image URL needs a host and no credentials", param)
    try:
        port = parts.port or HTTP_PORTS[parts.scheme.lower()]
    except ValueError:
        raise _refuse("the image URL has an invalid port", param) from None
    address = _public_address(host, port, param)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    remote = RemoteTarget(parts.scheme.lower(), host, parts.netloc, address, port, target)
    return _http_get(remote, param, policy)


@dataclass(frozen=True)
class RemoteTarget:
    scheme: str
    host: str  # as named in the URL: the TLS server name
    netloc: str  # host[:port] as the URL spells it: the Host header
    address: str  # the checked address connected to
    port: int
    path: str  # with the query


def _public_address(host: str, port: int, param: str) -> str:
    """One address of `host`, after checking that every address it resolves to is public."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise _refuse(f"the image host {host!r} cannot be resolved", param) from None
    addresses = [str(info[4][0]) for info in infos]
    if not addresses or not all(is_public_address(address) for address in addresses):
        raise _refuse(f"the image host {host!r} is not a public address; it is not fetched", param)
    return addresses[0]


def is_public_address(address: str) -> bool:
    """Globally routable unicast only: no loopback, private, link-local, multicast or reserved
    range, also when an IPv4 address hides inside an IPv6 one (mapped, 6to4, Teredo, NAT64)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in ipaddress.ip_network("64:ff9b::/96"):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and not is_public_address(str(embedded)):
            return False
    return ip.is_global and not ip.is_multicast and not ip.is_reserved


def _http_get(target: RemoteTarget, param: str, policy: MediaPolicy) -> bytes:
    """GET from the checked address itself (no second DNS lookup); redirects are refused."""
    connection = _connection(target, policy.remote_timeout_s)
    try:
        headers = {"Host": target.netloc, "Accept": "image/*"}
        connection.request("GET", target.path, headers=headers)
        response = connection.getresponse()
        if response.status != http.client.OK:
            raise _refuse(
                f"fetching the image answered HTTP {response.status} (redirects are not followed)",
                param,
            )
        declared = response.getheader("Content-Length", "")
        if _ascii_digits(declared) and int(declared[:18]) > policy.max_image_bytes:
            raise _too_big(param, policy)
        data = response.read(policy.max_image_bytes + 1)
    except (OSError, http.client.HTTPException) as exc:
        raise _refuse(f"fetching the image failed: {type(exc).__name__}", param) from None
    finally:
        connection.close()
    if len(data) > policy.max_image_bytes:
        raise _too_big(param, policy)
    return data


def _ascii_digits(text: str) -> bool:
    """Only 0-9: `str.isdigit` alone also takes "²", which `int` refuses (a 500 otherwise)."""
    return text.isascii() and text.isdigit()


def _connection(target: RemoteTarget, timeout_s: float) -> http.client.HTTPConnection:
    if target.scheme == "http":
        return http.client.HTTPConnection(target.address, target.port, timeout=timeout_s)
    return _PinnedHTTPSConnection(target.host, target.address, target.port, timeout_s)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a fixed address, with the certificate checked against the host name."""

    def __init__(self, host: str, address: str, port: int, timeout_s: float) -> None:
        self._address = address
        self._context = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout_s, context=self._context)

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host)


# --- decoding ------------------------------------------------------------------------------


def decode_image(data: bytes, param: str, policy: MediaPolicy) -> LoadedImage:
    """Format and size from the header first; decode only an allowed, small enough image."""
    Image.MAX_IMAGE_PIXELS = policy.max_image_pixels
    formats = [name.upper() for name in policy.formats]
    try:
        image = Image.open(io.BytesIO(data), formats=formats)
        _check_pixels(image.width, image.height, param, policy)
        image.seek(0)  # a GIF's first frame
        rgb = ImageOps.exif_transpose(image).convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _pixels_error(param, policy) from None
    except UnidentifiedImageError:
        raise _refuse(
            f"the data is not an image in an allowed format ({_allowed(policy)})",
            param,
            code="invalid_image_format",
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError):
        raise _refuse(
            "the image data is corrupt or truncated", param, code="invalid_image"
        ) from None
    return LoadedImage(rgb, hashlib.sha256(data).hexdigest(), str(image.format).lower())


def _check_pixels(width: int, height: int, param: str, policy: MediaPolicy) -> None:
    if width * height > policy.max_image_pixels:
        raise _pixels_error(param, policy)


def _pixels_error(param: str, policy: MediaPolicy) -> InvalidRequestError:
    return _refuse(
        f"the image has more than {policy.max_image_pixels} pixels",
        param,
        code="image_too_large",
    )
