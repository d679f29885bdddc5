"""Serving a registry: prometheus_client's exposition, defaulting to this
package's ``REGISTRY``.

``generate_latest`` and the WSGI server and app are prometheus_client's,
given this ``REGISTRY`` by default.  The ASGI app renders in a worker thread:
collecting a durable registry commits and reads the store, which must not
stall the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import prometheus_client.exposition as _pc
from prometheus_client.exposition import _bake_output
from prometheus_client.registry import Collector

from .registry import REGISTRY

__all__ = [
    "CONTENT_TYPE_LATEST",
    "CONTENT_TYPE_PLAIN_0_0_4",
    "MetricsHandler",
    "generate_latest",
    "make_asgi_app",
    "make_wsgi_app",
    "start_http_server",
    "start_wsgi_server",
    "write_to_textfile",
]

CONTENT_TYPE_LATEST = _pc.CONTENT_TYPE_LATEST
CONTENT_TYPE_PLAIN_0_0_4 = _pc.CONTENT_TYPE_PLAIN_0_0_4


def generate_latest(registry: Collector = REGISTRY, *args: Any, **kwargs: Any) -> bytes:
    """The text exposition of ``registry`` (prometheus_client's ``generate_latest``)."""
    return _pc.generate_latest(registry, *args, **kwargs)


def make_wsgi_app(registry: Collector = REGISTRY, disable_compression: bool = False) -> Any:
    """A WSGI app serving ``registry`` (prometheus_client's ``make_wsgi_app``)."""
    return _pc.make_wsgi_app(registry, disable_compression)


def start_http_server(
    port: int,
    addr: str = "0.0.0.0",  # noqa: S104 - prometheus_client's default
    registry: Collector = REGISTRY,
    **kwargs: Any,
) -> Any:
    """Serve ``registry`` on ``addr:port`` from a daemon thread
    (prometheus_client's ``start_http_server``)."""
    return _pc.start_http_server(port, addr, registry, **kwargs)


start_wsgi_server = start_http_server


def write_to_textfile(path: str, registry: Collector = REGISTRY, **kwargs: Any) -> None:
    """prometheus_client's ``write_to_textfile``."""
    _pc.write_to_textfile(path, registry, **kwargs)


class MetricsHandler(_pc.MetricsHandler):
    """prometheus_client's HTTP handler, serving this package's ``REGISTRY``."""

    registry: Collector = REGISTRY


def make_asgi_app(
    registry: Collector = REGISTRY, disable_compression: bool = False
) -> Callable[..., Any]:
    """An ASGI app serving ``registry``, rendered in a worker thread."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope.get("type") == "http"
        params = parse_qs(scope.get("query_string", b"").decode("utf8"))
        headers: dict[str, str] = {}
        for name, value in scope.get("headers", []):
            key = name.decode("latin-1").lower()
            if key in ("accept", "accept-encoding"):
                headers[key] = ",".join(filter(None, [headers.get(key), value.decode("latin-1")]))
        status, out_headers, output = await asyncio.to_thread(
            _bake_output, registry, headers.get("accept", ""),
            headers.get("accept-encoding", ""), params, disable_compression,
        )  # fmt: skip
        payload = await receive()
        if payload.get("type") == "http.request":
            await send({
                "type": "http.response.start",
                "status": int(status.split(" ")[0]),
                "headers": [tuple(x.encode("latin-1") for x in h) for h in out_headers],
            })  # fmt: skip
            await send({"type": "http.response.body", "body": output})

    return app
