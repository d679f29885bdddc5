"""WSGI middleware that counts every HTTP request of an app, durably (Flask, Django).

Example::

    import keepcount
    from keepcount.wsgi import KeepcountWSGIMiddleware

    registry = keepcount.open("sqlite:///counters.db", node="web-1")
    app.wsgi_app = KeepcountWSGIMiddleware(app.wsgi_app, registry)     # Flask
    application = KeepcountWSGIMiddleware(application, registry,       # Django
                                          route_for=lambda e: e.get("myapp.route"))

The same families as ``keepcount.asgi`` (``keepcount.httpmetrics``), the same
modes and the same failure behaviour; what differs is where a WSGI response
starts.  By PEP 3333 a server sends the status and headers only once the
app's iterable yields its first chunk (some servers wait for a non-empty
one), the app first calls ``write()``, or the iterable ends empty.  That
moment is the **send point**, and the middleware does its work just before
it:

- it counts the response with the status of the app's latest
  ``start_response()`` call (500 if there was none);
- in durable mode (``durable=True``, the default) it calls
  ``registry.commit_sync()`` and passes the chunk (or the ``write()``, or
  the end of the iterable) on to the server only once that returned;
  in bounded-async mode (``durable=False``) only the response that would
  exceed ``max_pending`` waits (``httpmetrics.PendingBound``);
- if that commit fails, nothing has gone to the server yet: it answers
  ``503`` with a JSON body ``{"error": {"code", "message"}}`` instead of
  the app's response, and closes the app's iterable.  The count stays in
  memory, with the app's status, for a later flush.

To make that possible the middleware calls the server's ``start_response``
itself, once, at the send point: with the status and headers of the app's
latest ``start_response()`` call, or with the 503's.  (So it works with
every server, including Werkzeug's test client, which re-raises any
``exc_info``.)  An app may call ``start_response()`` again with
``exc_info`` before the send point (the latest call wins) or after it (the
call goes to the server, which re-raises as PEP 3333 says).  An exception raised
by the app (from the call or from its iterable) is counted like in
``keepcount.asgi`` (status 500 if nothing was sent; durable before it
propagates in durable mode) and re-raised.  If the server closes the
iterable before the send point (the client went away), nothing is counted.

Duration: from the call of the middleware to the send point (before any
commit wait), which for most apps, that build the whole body before
returning it, is the whole handling time; a streaming body's later chunks
are not included.  Wrapping the iterable hides ``wsgi.file_wrapper`` from the
server, so file responses are sent by iteration rather than ``sendfile``.

Route template, read when the app calls ``start_response()`` (it has routed
by then, and Flask still has its request context; it clears
``environ["werkzeug.request"]`` once its ``wsgi_app`` returns), or at the
send point or exception if it never did:

- ``route_for(environ)`` if given (a string, or None for ``<unmatched>``);
  for Django, a small Django middleware can store
  ``request.resolver_match.route`` in ``request.environ`` for it to return;
- else Flask / Werkzeug: the rule of ``environ["werkzeug.request"].url_rule``
  (``/items/<int:item_id>``, as declared);
- else ``<unmatched>``: 404s, 405s, unknown frameworks, and exceptions that
  Flask propagates instead of answering with a 500 (``PROPAGATE_EXCEPTIONS``,
  on in testing and debug mode).  The raw path is never used.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    from _typeshed import OptExcInfo

__all__ = ["KeepcountWSGIMiddleware", "make_wsgi_app"]

logger = logging.getLogger("keepcount.http")

_Write = Callable[[bytes], object]


class KeepcountWSGIMiddleware:
    """Count a WSGI app's requests, errors and latency in ``registry``.

    Options as for ``keepcount.asgi.KeepcountMiddleware``; ``route_for``
    takes the WSGI environ.  Safe to call from many server threads at once.
    The registry is not closed by the middleware.
    """

    def __init__(
        self,
        app: WSGIApplication,
        registry: Registry,
        *,
        prefix: str = "http",
        durable: bool = True,
        max_pending: int = DEFAULT_MAX_PENDING,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        max_series: int | None = None,
        route_for: Callable[[WSGIEnvironment], str | None] | None = None,
    ) -> None:
        self.app = app
        self.registry = registry
        self.durable = durable
        self.metrics = HTTPMetrics(registry, prefix=prefix, buckets=buckets, max_series=max_series)
        self.bound = PendingBound(0 if durable else max_pending)
        self.route_for = route_for

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        exchange = _Exchange(self, environ, start_response)
        try:
            body = self.app(environ, exchange.start_response)
        except Exception as exc:
            exchange.failed(exc)
            raise
        return _Body(exchange, body)

    def route(self, environ: WSGIEnvironment) -> str:
        """The ``route`` label of a request whose routing is over."""
        if self.route_for is not None:
            return self.route_for(environ) or UNMATCHED
        rule = getattr(environ.get("werkzeug.request"), "url_rule", None)
        template = getattr(rule, "rule", None)
        return template if isinstance(template, str) else UNMATCHED


def _status_code(status: str) -> int:
    try:
        return int(status.split(None, 1)[0])
    except (ValueError, IndexError):
        return 500


class _Exchange:
    """One request going through the middleware."""

    __slots__ = (
        "counted", "environ", "error_counted", "headers", "lock", "mw", "replaced", "route",
        "sent", "start_response_", "started", "status", "write_",
    )  # fmt: skip

    def __init__(
        self, mw: KeepcountWSGIMiddleware, environ: WSGIEnvironment, start_response: StartResponse
    ) -> None:
        self.mw = mw
        self.environ = environ
        self.start_response_ = start_response
        self.started = time.perf_counter()
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.route: str | None = None
        self.write_: _Write | None = None
        self.sent = False
        """The send point has passed: the response is counted."""
        self.counted = False
        self.error_counted = False
        self.replaced = False
        self.lock = threading.Lock()  # an app may write() from another thread

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None
    ) -> _Write:
        """The app's ``start_response``: kept until the send point."""
        with self.lock:
            if self.sent:
                self.write_ = self.start_response_(status, headers, exc_info)
                return self.write
            self.status, self.headers = status, headers
            self.route = self.mw.route(self.environ)
        return self.write

    def write(self, data: bytes) -> None:
        with self.lock:
            if not self.sent:
                replacement = self.send_point()
                if replacement is not None:
                    assert self.write_ is not None
                    self.write_(replacement)
                    return
            if self.replaced:
                return
        if self.write_ is not None:
            self.write_(data)
        else:  # the app wrote before start_response: the server's error, as without us
            raise AssertionError("write() before start_response()")

    def send_point(self) -> bytes | None:
        """Count the response, then start it at the server (lock held).

        Returns the body of the 503 that replaces it if its count could not
        be made durable.
        """
        self.sent = True
        status = 500 if self.status is None else _status_code(self.status)
        failure = self._count(status)
        if failure is None:
            if self.status is not None:
                self.write_ = self.start_response_(self.status, self.headers)
            return None
        body = error_body(failure)
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ]
        self.write_ = self.start_response_("503 Service Unavailable", headers)
        self.replaced = True
        return body

    def _count(self, status: int) -> KeepcountError | None:
        self.counted = True
        error = status >= 500
        self.error_counted = error
        seconds = time.perf_counter() - self.started
        mw = self.mw
        if self.route is None:
            self.route = mw.route(self.environ)
        method = method_label(self.environ.get("REQUEST_METHOD", ""))
        if not mw.metrics.record(method, self.route, status, seconds, error=error):
            return None
        mark = mw.bound.counted()
        if mark is None:
            return None
        try:
            mw.registry.commit_sync()
        except KeepcountError as exc:
            logger.warning("keepcount: count of a %s response not durable: %s", status, exc)
            return exc
        mw.bound.committed(mark)
        return None

    def failed(self, exc: Exception) -> None:
        with self.lock:
            if not self.counted:
                self.sent = True
                failure = self._count(500)
                if failure is not None:
                    exc.add_note(f"keepcount: the count of this request is not durable: {failure}")
            elif not self.error_counted:
                self.error_counted = True
                method = method_label(self.environ.get("REQUEST_METHOD", ""))
                self.mw.metrics.record_error(method, self.route or UNMATCHED)


class _Body:
    """The app's iterable, with the send point and the 503 replacement."""

    __slots__ = ("app_iter", "body", "done", "exchange")

    def __init__(self, exchange: _Exchange, body: Iterable[bytes]) -> None:
        self.exchange = exchange
        self.body = body
        self.app_iter: Iterator[bytes] | None = None
        self.done = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self.done:
            raise StopIteration
        if self.app_iter is None:
            self.app_iter = iter(self.body)
        try:
            chunk = next(self.app_iter)
        except StopIteration:
            self.done = True
            replacement = self._send_point()
            if replacement is not None:
                return replacement
            raise
        except Exception as exc:
            self.exchange.failed(exc)
            raise
        if self.exchange.replaced:
            self.done = True  # the 503 went out through write(); the app's body goes nowhere
            raise StopIteration
        replacement = self._send_point()
        if replacement is not None:
            self.done = True
            return replacement
        return chunk

    def _send_point(self) -> bytes | None:
        ex = self.exchange
        with ex.lock:
            return None if ex.sent else ex.send_point()

    def close(self) -> None:
        close = getattr(self.body, "close", None)
        if close is not None:
            close()


def make_wsgi_app(registry: Registry, *, per_worker: bool = False) -> WSGIApplication:
    """A WSGI app serving the host's ``/metrics`` (``keepcount.hostmetrics``).

    Like prometheus_client's ``make_wsgi_app``: mount it at ``/metrics``
    (Flask: ``DispatcherMiddleware``; Django: a view calling it).  Whichever
    worker answers, it shows every slot of the host summed, from durable
    values.  A store that cannot be read gets ``503`` with a JSON error body.
    """
    view = HostView(registry, per_worker=per_worker)

    def metrics_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        try:
            body, content_type = view.render(environ.get("HTTP_ACCEPT"))
        except KeepcountError as exc:
            logger.warning("keepcount: /metrics cannot read the store: %s", exc)
            body, content_type, status = (
                error_body(exc),
                "application/json",
                "503 Service Unavailable",
            )
        else:
            status = "200 OK"
        headers = [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
        ]
        start_response(status, headers)
        return [body]

    return metrics_app
