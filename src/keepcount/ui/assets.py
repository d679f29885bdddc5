"""The live page's files, served from the package (no build step, no CDN).

``GET /ui`` is the page; it loads ``/ui/ui.css``, ``/ui/ui.js`` and the
vendored charting library (uPlot, ``vendor/``; see ``vendor/VENDOR.md``)
by URLs relative to itself, and polls ``/ui/state.json`` (each server adds
that route itself: see ``keepcount.ui.state``).

Every file is answered with a Content-Security-Policy that allows scripts,
styles and requests from the same origin only: even a label value that
reached the DOM as HTML could not run a script (the page never puts one
there: it writes every name and value with ``textContent``).

Example::

    from starlette.applications import Starlette
    from keepcount.ui import STATE_PATH, asset_routes

    app = Starlette(routes=[*asset_routes(), Route(STATE_PATH, my_state)])
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

__all__ = ["ASSETS", "PAGE_PATH", "SECURITY_HEADERS", "STATE_PATH", "asset_routes", "read_asset"]

PAGE_PATH = "/ui"
STATE_PATH = "/ui/state.json"

ASSETS: dict[str, tuple[str, str]] = {
    PAGE_PATH: ("index.html", "text/html; charset=utf-8"),
    "/ui/ui.css": ("ui.css", "text/css; charset=utf-8"),
    "/ui/ui.js": ("ui.js", "text/javascript; charset=utf-8"),
    "/ui/uPlot.min.css": ("vendor/uPlot.min.css", "text/css; charset=utf-8"),
    "/ui/uPlot.iife.min.js": ("vendor/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
}
"""URL path -> (file under ``keepcount/ui/``, Content-Type)."""

SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    # Small files, changed with the package: revalidate rather than serve an old page.
    "cache-control": "no-cache",
}


@functools.cache
def read_asset(path: str) -> bytes:
    """The bytes of the file served at ``path`` (a key of ``ASSETS``), read once."""
    name, _ = ASSETS[path]
    return resources.files("keepcount.ui").joinpath(name).read_bytes()


def _endpoint(path: str) -> Callable[[Request], Awaitable[Response]]:
    content_type = ASSETS[path][1]

    async def asset(request: Request) -> Response:
        return Response(read_asset(path), 200, {**SECURITY_HEADERS, "content-type": content_type})

    asset.__doc__ = f"GET {path}: {ASSETS[path][0]} of the live page."
    return asset


def asset_routes() -> list[Route]:
    """One GET route per file of the page (``ASSETS``)."""
    return [Route(path, _endpoint(path), methods=["GET"]) for path in ASSETS]
