"""ASGI middleware that counts every HTTP request of an app, durably.

Example::

    import keepcount
    from keepcount.asgi import KeepcountMiddleware

    registry = keepcount.open("sqlite:///counters.db", node="web-1")
    app = KeepcountMiddleware(app, registry)            # any ASGI app
    # or, in Starlette / FastAPI: app.add_middleware(KeepcountMiddleware, registry=registry)

It counts the families of ``keepcount.httpmetrics`` (requests by method,
route template and status; errors; latency).  Invariants:

- **Durable mode** (``durable=True``, the default): a response starts only
  once its count is durable.  The middleware counts it when the app sends
  ``http.response.start``, awaits ``registry.commit()``, and only then
  forwards that message.  Concurrent requests share one store write (group
  commit).
- **Bounded-async mode** (``durable=False``): responses start without
  waiting, but at most ``max_pending`` of them have started while their
  count was not durable (``PendingBound``): the response that would exceed
  the bound awaits a commit first.  A crash loses at most ``max_pending``
  answered responses' counts.
- **A count that could not be made durable is never passed off as one.**
  When a commit a response waits for fails (``StoreUnavailable``,
  ``Fenced``, ``RegistryClosed``: any ``KeepcountError``), the app's
  response is dropped unsent and replaced with ``503`` and a JSON body
  ``{"error": {"code", "message"}}`` (``code`` is the error's, e.g.
  ``store_unavailable``).  The app has already run, so the request may have
  taken effect; 503 tells the client it was not acknowledged.  The count
  stays in memory, with the app's status, and a later flush writes it.
- Exceptions the app raises are counted (status 500 if no response started,
  and as an error) and re-raised unchanged; in durable mode the count is
  made durable before the exception propagates, so before the 500 an outer
  error handler sends.  If that commit fails, the exception carries a note
  saying so.  An exception after the response started counts as an error of
  that request (its status label stays the one it started with).
- An app that returns without starting a response is counted as a 500.
  A cancelled request (``CancelledError``, which is no ``Exception``) is not
  counted.
- A label set the registry refuses (a family at its ``max_series`` limit)
  is logged; that response goes on uncounted and does not wait.
- Lifespan and websocket scopes pass through, but before the app's
  ``lifespan.shutdown.complete`` goes out every count is made durable
  (``registry.commit()``): a graceful stop (SIGTERM) of uvicorn ends the
  process right after it, without running atexit.

Labels: ``method`` as in ``httpmetrics.method_label``; ``status`` from
``http.response.start``; ``route`` is the template of the route the
framework matched, read when the response starts (routing is over by then):

- ``route_for(scope)`` if given (a string, or None for ``<unmatched>``);
- else Starlette / FastAPI's ``scope["route"]`` (which their router stores
  in the scope it passes on, so the middleware must wrap the framework's app
  or be added with ``add_middleware``, not sit behind a scope copy): its
  ``path_format`` (``/items/{item_id}``, converters dropped), prefixed with
  the paths of the ``Mount``\\ s that lead to it;
- else ``<unmatched>``: 404s, redirects of trailing slashes, and apps whose
  router the middleware cannot read.  The raw path is never used.

Duration: from the call of the middleware to the ``http.response.start``
message (or the exception), before any commit wait: the time to the
response's headers.  A streaming body's later chunks are not included.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from keepcount.errors import KeepcountError
from keepcount.hostmetrics import HostView
from keepcount.httpmetrics import (
    DEFAULT_MAX_PENDING,
    UNMATCHED,
    HTTPMetrics,
    PendingBound,
    error_body,
    method_label,
)
from keepcount.metrics import DEFAULT_BUCKETS
from keepcount.registry import Registry

__all__ = ["ASGIApp", "KeepcountMiddleware", "Message", "Receive", "Scope", "Send", "make_asgi_app"]

logger = logging.getLogger("keepcount.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
RouteFor = Callable[[Scope], str | None]


class KeepcountMiddleware:
    """Count an ASGI app's requests, errors and latency in ``registry``.

    See the module docstring for what is counted and when a response may
    start.  ``prefix`` names the families (``{prefix}_requests_total``,
    ...); ``buckets`` are the latency histogram's bounds in seconds;
    ``max_series`` overrides the registry's label-set limit per family;
    ``route_for(scope)`` names the route template for frameworks other
    than Starlette / FastAPI.  The registry is not closed by the middleware.

    Example::

        >>> app = KeepcountMiddleware(app, registry, durable=False, max_pending=100)  # doctest: +SKIP
    """

    def __init__(
        self,
        app: ASGIApp,
        registry: Registry,
        *,
        prefix: str = "http",
        durable: bool = True,
        max_pending: int = DEFAULT_MAX_PENDING,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        max_series: int | None = None,
        route_for: RouteFor | None = None,
    ) -> None:
        self.app = app
        self.registry = registry
        self.durable = durable
        self.metrics = HTTPMetrics(registry, prefix=prefix, buckets=buckets, max_series=max_series)
        self.bound = PendingBound(0 if durable else max_pending)
        self.route_for = route_for
        self._templates: dict[tuple[int, int], tuple[object, str]] = {}
        """(id(router), id(route)) -> (route, its full template); the route
        is kept so its id cannot be reused by another object."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                send = self._flush_at_shutdown(send)
            await self.app(scope, receive, send)
            return
        exchange = _Exchange(self, scope, send)
        try:
            await self.app(scope, receive, exchange.send)
        except Exception as exc:
            await exchange.failed(exc)
            raise
        await exchange.finished()

    def _flush_at_shutdown(self, send: Send) -> Send:
        """``send`` that makes every count durable before the app's
        ``lifespan.shutdown.complete`` goes out: a server may end the
        process right after it (uvicorn re-raises the SIGTERM it caught,
        so neither atexit nor any finalizer runs)."""

        async def send_after_flush(message: Message) -> None:
            if message.get("type") == "lifespan.shutdown.complete" and not self.registry.closed:
                try:
                    await self.registry.commit()
                except KeepcountError as exc:
                    logger.warning("keepcount: counts not durable at shutdown: %s", exc)
            await send(message)

        return send_after_flush

    # -- route templates -------------------------------------------------------

    def route(self, scope: Scope) -> str:
        """The ``route`` label of a request whose routing is over."""
        if self.route_for is not None:
            return self.route_for(scope) or UNMATCHED
        route = scope.get("route")
        if route is None:
            return UNMATCHED
        key = (id(scope.get("router")), id(route))
        known = self._templates.get(key)
        if known is not None:
            return known[1]
        template = _template(scope.get("router"), route)
        if template is None:
            return UNMATCHED
        self._templates[key] = (route, template)
        return template


def _own_path(route: object) -> str | None:
    path = getattr(route, "path_format", None)
    if not isinstance(path, str):
        path = getattr(route, "path", None)
    return path if isinstance(path, str) else None


def _template(router: object, route: object) -> str | None:
    """``route``'s path template, with the prefixes of the mounts that lead to
    it from ``router`` (Starlette only tells the innermost route)."""
    own = _own_path(route)
    if own is None:
        return None
    prefix = _mount_prefix(getattr(router, "routes", None), route, depth=0)
    return own if prefix is None else prefix + own


def _mount_prefix(routes: object, target: object, depth: int) -> str | None:
    """The joined mount paths from ``routes`` down to ``target`` ("" at the top
    level), or None if it is not found."""
    if not isinstance(routes, list) or depth > 16:
        return None
    for r in routes:
        if r is target:
            return ""
    for r in routes:
        children = getattr(r, "routes", None)
        if not children:
            continue
        below = _mount_prefix(children, target, depth + 1)
        if below is not None:
            path = getattr(r, "path_format", "")  # a Mount's ends in /{path}; a Host has none
            mount = path.removesuffix("/{path}") if isinstance(path, str) else ""
            return mount + below
    return None


class _Exchange:
    """One HTTP request going through the middleware."""

    __slots__ = ("counted", "error_counted", "mw", "replaced", "scope", "send_", "started")

    def __init__(self, mw: KeepcountMiddleware, scope: Scope, send: Send) -> None:
        self.mw = mw
        self.scope = scope
        self.send_ = send
        self.started = time.perf_counter()
        self.counted = False
        self.error_counted = False
        self.replaced = False

    async def send(self, message: Message) -> None:
        if self.replaced:
            return  # the app's response was replaced by the 503: it goes nowhere
        if message["type"] == "http.response.start" and not self.counted:
            status = message["status"]
            failure = await self._count(status)
            if failure is not None:
                self.replaced = True
                body = error_body(failure)
                await self.send_(
                    {
                        "type": "http.response.start",
                        "status": 503,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store"),
                        ],
                    }
                )
                await self.send_({"type": "http.response.body", "body": body, "more_body": False})
                return
        await self.send_(message)

    async def _count(self, status: int) -> KeepcountError | None:
        """Count the response; wait for a commit if the bound says so.

        Returns the commit's error if the count could not be made durable.
        """
        self.counted = True
        error = status >= 500
        self.error_counted = error
        seconds = time.perf_counter() - self.started
        mw = self.mw
        method = method_label(self.scope["method"])
        if not mw.metrics.record(method, mw.route(self.scope), status, seconds, error=error):
            return None
        mark = mw.bound.counted()
        if mark is None:
            return None
        try:
            await mw.registry.commit()
        except KeepcountError as exc:
            logger.warning("keepcount: count of a %s response not durable: %s", status, exc)
            return exc
        mw.bound.committed(mark)
        return None

    async def failed(self, exc: Exception) -> None:
        if not self.counted:
            failure = await self._count(500)
            if failure is not None:
                exc.add_note(f"keepcount: the count of this request is not durable: {failure}")
        elif not self.error_counted:
            self.error_counted = True
            method = method_label(self.scope["method"])
            self.mw.metrics.record_error(method, self.mw.route(self.scope))

    async def finished(self) -> None:
        if not self.counted:
            logger.warning("keepcount: ASGI app returned without starting a response")
            await self._count(500)


def make_asgi_app(registry: Registry, *, per_worker: bool = False) -> ASGIApp:
    """An ASGI app serving the host's ``/metrics`` (``keepcount.hostmetrics``).

    Like prometheus_client's ``make_asgi_app``: mount it at ``/metrics``
    (Starlette / FastAPI: ``app.mount("/metrics", make_asgi_app(registry))``).
    Whichever worker answers, it shows every slot of the host summed, from
    durable values; the store is read in a thread, never on the event loop.
    A store that cannot be read gets ``503`` with a JSON error body.
    """
    view = HostView(registry, per_worker=per_worker)

    async def metrics_app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        accept = None
        for name, value in scope.get("headers", ()):
            if name == b"accept":
                accept = value.decode("latin-1")
        try:
            body, content_type = await asyncio.to_thread(view.render, accept)
            status = 200
        except KeepcountError as exc:
            logger.warning("keepcount: /metrics cannot read the store: %s", exc)
            body, content_type, status = error_body(exc), "application/json", 503
        headers = [
            (b"content-type", content_type.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return metrics_app
