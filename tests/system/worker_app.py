"""The app the multi-worker tests serve: one counted route and the host's /metrics.

``app`` is WSGI (gunicorn sync / gthread workers), ``asgi_app`` ASGI
(uvicorn, gunicorn with uvicorn workers).  Configured only by
``KEEPCOUNT_STORE`` and ``KEEPCOUNT_NODE``, the same for every worker;
``WORKER_APP_DURABLE=0`` selects bounded-async mode.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import keepcount
from keepcount.asgi import KeepcountMiddleware, make_asgi_app
from keepcount.wsgi import KeepcountWSGIMiddleware, make_wsgi_app

registry = keepcount.open(os.environ["KEEPCOUNT_STORE"], node=os.environ["KEEPCOUNT_NODE"])
DURABLE = os.environ.get("WORKER_APP_DURABLE", "1") == "1"
MAX_PENDING = int(os.environ.get("WORKER_APP_MAX_PENDING", "1000"))


def _hit(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    body = f"{registry.node} {os.getpid()}".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


_counted = KeepcountWSGIMiddleware(
    _hit,
    registry,
    durable=DURABLE,
    max_pending=MAX_PENDING,
    route_for=lambda environ: environ.get("PATH_INFO"),
)
_metrics = make_wsgi_app(registry)


def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    if environ.get("PATH_INFO") == "/metrics":
        return _metrics(environ, start_response)
    return _counted(environ, start_response)


async def _ahit(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            kind = (await receive())["type"]
            await send({"type": kind + ".complete"})  # lifespan.startup / .shutdown
            if kind == "lifespan.shutdown":
                return
    body = f"{registry.node} {os.getpid()}".encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


_acounted = KeepcountMiddleware(
    _ahit,
    registry,
    durable=DURABLE,
    max_pending=MAX_PENDING,
    route_for=lambda scope: scope.get("path"),
)
_ametrics = make_asgi_app(registry)


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http" and scope.get("path") == "/metrics":
        await _ametrics(scope, receive, send)
    else:
        await _acounted(scope, receive, send)
