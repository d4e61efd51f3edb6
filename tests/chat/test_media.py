"""The media policy without a model: sources, limits, formats and address checks.

Whether a file is opened is seen by a Python audit hook (every `open` and `os.open` of this
process passes through it), so a refusal that still read the file fails these tests.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import struct
import sys
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from mlx_engine_server.chat.media import (
    MediaPolicy,
    RemoteTarget,
    _http_get,
    decode_image,
    is_public_address,
    load_image,
)
from mlx_engine_server.errors import InvalidRequestError

PARAM = "messages[0].content[1].image_url"

_opened: list[str] = []
_watching = threading.Event()


def _audit(event: str, args: tuple[object, ...]) -> None:
    if _watching.is_set() and event == "open" and args and isinstance(args[0], str | Path):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)


@pytest.fixture
def opened() -> Iterator[list[str]]:
    """Paths this process opens while the test runs."""
    _opened.clear()
    _watching.set()
    yield _opened
    _watching.clear()


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (20, 10), color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


def data_uri(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims `width` x `height` pixels in a few dozen bytes (a decompression bomb's
    shape): signature, IHDR, a tiny IDAT, IEND."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def refused(url: str, policy: MediaPolicy) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as caught:
        load_image(url, PARAM, policy)
    assert caught.value.param == PARAM
    assert caught.value.status_code == 400
    return caught.value


# --- data URIs and formats ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "media_type"),
    [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif")],
)
def test_each_allowed_format_decodes_to_rgb(fmt: str, media_type: str) -> None:
    loaded = load_image(data_uri(image_bytes(fmt), media_type), PARAM, MediaPolicy())
    assert loaded.image.mode == "RGB"
    assert loaded.image.size == (20, 10)
    assert loaded.format == fmt.lower()


def test_a_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), color) for color in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    loaded = load_image(data_uri(buffer.getvalue(), "image/gif"), PARAM, MediaPolicy())
    red, _, blue = loaded.image.getpixel((4, 4))  # type: ignore[misc]
    assert red > 200
    assert blue < 50


def test_the_digest_is_of_the_bytes() -> None:
    first = load_image(data_uri(image_bytes(color="red")), PARAM, MediaPolicy())
    again = load_image(data_uri(image_bytes(color="red")), PARAM, MediaPolicy())
    other = load_image(data_uri(image_bytes(color="blue")), PARAM, MediaPolicy())
    assert first.digest == again.digest != other.digest


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png;base64,@@not-base64@@",
        "data:image/png;base64,iVBORw0KGgo",  # valid characters, wrong padding
    ],
)
def test_malformed_base64_is_refused(url: str) -> None:
    assert refused(url, MediaPolicy()).code == "invalid_base64"


def test_svg_is_refused_by_its_type_and_by_its_bytes() -> None:
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
    assert refused(data_uri(svg, "image/svg+xml"), MediaPolicy()).code == "invalid_image_format"
    # Declared as PNG, the bytes are still SVG: Pillow is asked for the allowed formats only.
    assert refused(data_uri(svg, "image/png"), MediaPolicy()).code == "invalid_image_format"


def test_a_format_the_operator_left_out_is_refused() -> None:
    policy = MediaPolicy(formats=("png",))
    assert refused(data_uri(image_bytes("JPEG"), "image/jpeg"), policy).code == (
        "invalid_image_format"
    )
    # ... also when the bytes are JPEG under a PNG label.
    assert refused(data_uri(image_bytes("JPEG")), policy).code == "invalid_image_format"


def test_data_uri_without_base64_is_refused() -> None:
    assert refused("data:image/png,rawdata", MediaPolicy()).code == "invalid_image_url"


def test_truncated_image_is_a_400() -> None:
    assert (
        refused(data_uri(image_bytes(size=(64, 64), color="red")[:50]), MediaPolicy()).code
        == "invalid_image"
    )


# --- limits ---------------------------------------------------------------------------------


def test_too_many_bytes_is_refused_before_decoding() -> None:
    data = image_bytes(size=(200, 200))
    error = refused(data_uri(data), MediaPolicy(max_image_bytes=len(data) - 1))
    assert error.code == "image_too_large"
    load_image(data_uri(data), PARAM, MediaPolicy(max_image_bytes=len(data)))


def test_pixels_over_the_limit_are_refused_from_the_header() -> None:
    error = refused(data_uri(image_bytes(size=(200, 200))), MediaPolicy(max_image_pixels=39_999))
    assert error.code == "image_too_large"
    load_image(data_uri(image_bytes(size=(200, 200))), PARAM, MediaPolicy(max_image_pixels=40_000))


def test_a_decompression_bomb_is_refused_without_decoding() -> None:
    bomb = png_header_only(100_000, 100_000)  # 10^10 pixels in under 100 bytes
    assert len(bomb) < 100
    assert refused(data_uri(bomb), MediaPolicy()).code == "image_too_large"
    # Far past Pillow's own guard (twice its limit) it is still our 400, not Pillow's error.
    assert decode_image is not None
    with pytest.raises(InvalidRequestError):
        decode_image(png_header_only(60_000, 60_000), PARAM, MediaPolicy(max_image_pixels=1000))


# --- local files ----------------------------------------------------------------------------


@pytest.fixture
def media_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """An allowed directory with photo.png, and a secret.png beside it (outside)."""
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "photo.png").write_bytes(image_bytes())
    (tmp_path / "secret.png").write_bytes(image_bytes(color="blue"))
    return allowed, tmp_path / "secret.png"


def test_files_are_off_without_allowed_dirs(
    media_dirs: tuple[Path, Path], opened: list[str]
) -> None:
    allowed, _ = media_dirs
    refused(f"file://{allowed}/photo.png", MediaPolicy())
    assert not opened


def test_a_file_inside_an_allowed_dir_is_read(media_dirs: tuple[Path, Path]) -> None:
    allowed, _ = media_dirs
    policy = MediaPolicy(allowed_dirs=(allowed,))
    assert load_image(f"file://{allowed}/photo.png", PARAM, policy).image.size == (20, 10)
    assert load_image(f"{allowed}/photo.png", PARAM, policy).image.size == (20, 10)
    assert load_image(f"file://localhost{allowed}/ph%6fto.png", PARAM, policy).format == "png"


def traversal_urls(allowed: Path, secret: Path) -> list[str]:
    link = allowed / "link.png"
    link.symlink_to(secret)
    (allowed / "dirlink").symlink_to(secret.parent)
    return [
        str(secret),
        f"file://{secret}",
        f"file://{allowed}/../secret.png",
        f"{allowed}/sub/../../secret.png",
        f"file://{allowed}/%2e%2e/secret.png",
        f"file://{allowed}/sub/%2E%2E%2F%2E%2E%2Fsecret.png",
        f"file://{link}",
        f"{allowed}/dirlink/secret.png",
        f"file://evil.example.com{allowed}/photo.png",
        "photo.png",
    ]


def test_paths_leaving_the_allowed_dir_are_refused_unread(
    media_dirs: tuple[Path, Path], opened: list[str]
) -> None:
    allowed, secret = media_dirs
    policy = MediaPolicy(allowed_dirs=(allowed,))
    for url in traversal_urls(allowed, secret):
        error = refused(url, policy)
        assert error.code == "invalid_image_url", url
    assert not [path for path in opened if "secret" in path]


def test_a_fifo_or_directory_in_the_allowed_dir_is_refused(media_dirs: tuple[Path, Path]) -> None:
    allowed, _ = media_dirs
    os.mkfifo(allowed / "pipe.png")
    policy = MediaPolicy(allowed_dirs=(allowed,))
    refused(f"{allowed}/pipe.png", policy)  # would block forever if read as a file
    refused(f"{allowed}/sub", policy)
    refused(str(allowed), policy)


# --- remote URLs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "2002:7f00:0001::1",  # 6to4 of 127.0.0.1
        "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo of 127.0.0.1
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "fe80::1%eth0",
        "not-an-address",
    ],
)
def test_non_public_addresses(address: str) -> None:
    assert not is_public_address(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses(address: str) -> None:
    assert is_public_address(address)


def test_remote_urls_are_off_unless_allowed() -> None:
    assert "allow-remote-media" in refused("https://example.com/a.png", MediaPolicy()).message


def test_unknown_schemes_are_refused() -> None:
    for url in ("ftp://example.com/a.png", "gopher://x/", "javascript:alert(1)", "C:\\a.png"):
        refused(url, MediaPolicy(allow_remote=True, allowed_dirs=(Path("/"),)))


@pytest.mark.parametrize("declared", ["²", "1³", "9" * 5000])
def test_a_remote_content_length_is_read_as_ascii_digits_or_not_at_all(declared: str) -> None:
    """ "²" passes str.isdigit but not int(): it was a 500; a huge number is too big at once."""
    png = image_bytes()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        reply = f"HTTP/1.1 200 OK\r\nContent-Length: {declared}\r\nConnection: close\r\n\r\n"
        serving = threading.Thread(target=_answer_once, args=(listener, reply, png), daemon=True)
        serving.start()
        port = listener.getsockname()[1]
        target = RemoteTarget("http", "127.0.0.1", f"127.0.0.1:{port}", "127.0.0.1", port, "/a")
        if len(declared) > 20:
            with pytest.raises(InvalidRequestError, match="larger than"):
                _http_get(target, PARAM, MediaPolicy(allow_remote=True))
        else:
            assert _http_get(target, PARAM, MediaPolicy(allow_remote=True)) == png
        serving.join(timeout=5)


def _answer_once(listener: socket.socket, head: str, body: bytes) -> None:
    connection, _ = listener.accept()
    with connection:
        connection.recv(65536)
        connection.sendall(head.encode("latin-1") + body)
