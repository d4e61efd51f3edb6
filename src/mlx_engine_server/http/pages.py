"""The browser pages: GET / (the status page, with a chat box) and GET /docs (the API reference,
drawn in the browser from /openapi.json), their scripts and style sheet under /static/.

Plain files shipped in the package (http/static/), read once; no build step, nothing from a CDN.
Every URL in them is relative, so they work under --root-path. They hold no secret, so the API-key
guard lets them through (PAGE_PATHS); what they fetch needs the key, which they ask for on a 401
and keep in sessionStorage. Their Content-Security-Policy allows this origin only: no inline
script or style, no frames, no other host.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from starlette.requests import Request
from starlette.responses import Response

from ..errors import NotFoundError

PAGES = {"/": "status.html", "/docs": "docs.html"}
ASSET_TYPES = {
    "pages.css": "text/css; charset=utf-8",
    "common.js": "text/javascript; charset=utf-8",
    "status.js": "text/javascript; charset=utf-8",
    "docs.js": "text/javascript; charset=utf-8",
}
PAGE_PATHS = frozenset({*PAGES, *(f"/static/{name}" for name in ASSET_TYPES)})
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: a new version of the server brings new files
}


@cache
def _read(name: str) -> bytes:
    return (files(__package__) / "static" / name).read_bytes()


def _file(name: str, media_type: str) -> Response:
    return Response(_read(name), media_type=media_type, headers=PAGE_HEADERS)


async def status_page(request: Request) -> Response:
    return _file(PAGES["/"], "text/html; charset=utf-8")


async def docs_page(request: Request) -> Response:
    return _file(PAGES["/docs"], "text/html; charset=utf-8")


async def static_file(request: Request) -> Response:
    """Only the files named in ASSET_TYPES: the name never reaches the file system otherwise."""
    name = request.path_params["name"]
    media_type = ASSET_TYPES.get(name)
    if media_type is None:
        raise NotFoundError("No such static file.", param="name")
    return _file(name, media_type)
