"""The Flask app of ``keepcount bench workers``, its metrics backend chosen by env.

``KEEPCOUNT_BENCH_BACKEND`` picks how the app counts its requests:

- ``none``: no metrics at all;
- ``multiprocess``: prometheus_client in multiprocess mode
  (``PROMETHEUS_MULTIPROC_DIR`` must be set before prometheus_client is
  imported; the gunicorn config's ``child_exit`` hook calls
  ``mark_process_dead``), ``/metrics`` through a ``MultiProcessCollector``;
- ``pdc``: prometheus-distributed-client's SQLite backend on
  ``PDC_SQLITE`` (its ``setup()``, given one connection per thread);
- ``keepcount-async`` / ``keepcount-durable``: ``keepcount.open()`` on
  ``KEEPCOUNT_STORE`` as ``KEEPCOUNT_NODE`` at import (in each gunicorn
  worker: the app is not preloaded; each takes a slot of the host) and
  ``KeepcountWSGIMiddleware`` with ``durable=False`` / ``True``;
  ``/metrics`` is ``keepcount.wsgi.make_wsgi_app`` (the host's slots summed).

Every backend counts the same three families the same way, once per request,
just before the response starts: ``http_requests_total{method,route,status}``,
``http_request_errors_total{method,route}`` (status >= 500 or the app raised)
and ``http_request_duration_seconds{method,route}`` (prometheus_client's
default buckets, which are keepcount's too).  For the prometheus_client
backends a small WSGI middleware (``CountingMiddleware``) does what
keepcount's does.  ``/metrics`` is dispatched in front of the counted app
(never counted); ``/ready`` is counted like any route but is not the
benchmark's route (``/hello``).

The runner copies this file under another name into its work directory and
gives gunicorn that directory as ``--pythonpath``: the module is imported as
a top-level module, so that prometheus-distributed-client's virtual
environment, which has no keepcount, can run it too.  It imports keepcount
only for the keepcount backends.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from flask import Flask

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    from _typeshed import OptExcInfo

BACKENDS = ("none", "multiprocess", "pdc", "keepcount-async", "keepcount-durable")
ROUTE = "/hello"
READY_ROUTE = "/ready"
METRICS_PATH = "/metrics"
_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
_UNMATCHED = "<unmatched>"

app = Flask(__name__)


@app.route(ROUTE, methods=["GET", "POST"])
def hello() -> str:
    return "hello\n"


@app.route(READY_ROUTE)
def ready() -> str:
    return "ready\n"


def _route(environ: WSGIEnvironment) -> str:
    """The route template Flask matched (as keepcount.wsgi reads it)."""
    rule = getattr(environ.get("werkzeug.request"), "url_rule", None)
    template = getattr(rule, "rule", None)
    return template if isinstance(template, str) else _UNMATCHED


class CountingMiddleware:
    """keepcount.wsgi's three families, counted into prometheus_client metrics.

    Counts when the app has returned its (already built) body, before the
    server starts the response: the send point of a Flask response.
    """

    def __init__(self, wsgi_app: WSGIApplication, requests: Any, errors: Any, duration: Any):
        self.app = wsgi_app
        self.requests = requests
        self.errors = errors
        self.duration = duration

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        started = time.perf_counter()
        seen: dict[str, str] = {}

        def start(
            status: str, headers: list[tuple[str, str]], exc_info: OptExcInfo | None = None
        ) -> Callable[[bytes], object]:
            seen["status"], seen["route"] = status, _route(environ)
            return start_response(status, headers, exc_info)

        method = environ.get("REQUEST_METHOD", "")
        method = method if method in _METHODS else "OTHER"
        try:
            body = self.app(environ, start)
        except Exception:
            self._record(method, seen.get("route") or _route(environ), 500, started)
            raise
        try:
            status = int(seen.get("status", "500").split(None, 1)[0])
        except ValueError:
            status = 500
        self._record(method, seen.get("route") or _route(environ), status, started)
        return body

    def _record(self, method: str, route: str, status: int, started: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.duration.labels(method, route).observe(time.perf_counter() - started)
        if status >= 500:
            self.errors.labels(method, route).inc()


def _declare(module: Any, registry: Any) -> tuple[Any, Any, Any]:
    """The three families, from ``module`` (prometheus_client or pdc's backend)."""
    kw: dict[str, Any] = {} if registry is None else {"registry": registry}
    requests = module.Counter(
        "http_requests_total", "HTTP requests answered", ["method", "route", "status"], **kw
    )
    errors = module.Counter(
        "http_request_errors_total", "HTTP requests with a 5xx status", ["method", "route"], **kw
    )
    duration = module.Histogram(
        "http_request_duration_seconds", "Seconds to the response", ["method", "route"], **kw
    )
    return requests, errors, duration


class _Dispatch:
    """``/metrics`` to ``metrics``, everything else to the (counted) app."""

    def __init__(self, counted: WSGIApplication, metrics: WSGIApplication | None) -> None:
        self.counted = counted
        self.metrics = metrics

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if self.metrics is not None and environ.get("PATH_INFO") == METRICS_PATH:
            return self.metrics(environ, start_response)
        return self.counted(environ, start_response)


def _text_app(render: Callable[[], tuple[bytes, str]]) -> WSGIApplication:
    def metrics(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        body, content_type = render()
        start_response(
            "200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        )
        return [body]

    return metrics


def _multiprocess() -> WSGIApplication:
    import prometheus_client
    from prometheus_client import multiprocess

    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        raise RuntimeError("the multiprocess backend needs PROMETHEUS_MULTIPROC_DIR")
    app.wsgi_app = CountingMiddleware(app.wsgi_app, *_declare(prometheus_client, None))  # type: ignore[method-assign]

    def render() -> tuple[bytes, str]:
        registry = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return prometheus_client.generate_latest(registry), prometheus_client.CONTENT_TYPE_LATEST

    return _text_app(render)


class _PerThreadConnection:
    """What pdc uses of a ``sqlite3.Connection`` (``cursor``, ``commit``), per thread.

    A 30 s busy timeout instead of 5 s: two workers write one file.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.local = threading.local()

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = sqlite3.connect(self.path, timeout=30)
        return conn

    def cursor(self) -> sqlite3.Cursor:
        return self._conn().cursor()

    def commit(self) -> None:
        self._conn().commit()


def _pdc() -> WSGIApplication:
    import prometheus_client
    from prometheus_distributed_client import (  # type: ignore[import-not-found]
        setup,
        sqlite,
    )

    # Its documented setup, in the worker (after the fork), but with one
    # connection per thread: pdc keeps one for the process, and a sqlite3
    # connection shared by gthread's threads fails (one's BEGIN inside
    # another's transaction: about 30 % of requests answered 500).
    setup(sqlite=_PerThreadConnection(os.environ["PDC_SQLITE"]))
    registry = prometheus_client.CollectorRegistry()
    app.wsgi_app = CountingMiddleware(app.wsgi_app, *_declare(sqlite, registry))  # type: ignore[method-assign]

    def render() -> tuple[bytes, str]:
        return prometheus_client.generate_latest(registry), prometheus_client.CONTENT_TYPE_LATEST

    return _text_app(render)


def _keepcount(durable: bool) -> WSGIApplication:
    import keepcount
    from keepcount.wsgi import KeepcountWSGIMiddleware, make_wsgi_app

    registry = keepcount.open(os.environ["KEEPCOUNT_STORE"], node=os.environ["KEEPCOUNT_NODE"])
    app.wsgi_app = KeepcountWSGIMiddleware(app.wsgi_app, registry, durable=durable)  # type: ignore[method-assign]
    return make_wsgi_app(registry)  # the host's slots summed, whichever worker answers


def _build(backend: str) -> WSGIApplication | None:
    if backend == "none":
        return None
    if backend == "multiprocess":
        return _multiprocess()
    if backend == "pdc":
        return _pdc()
    if backend in ("keepcount-async", "keepcount-durable"):
        return _keepcount(durable=backend == "keepcount-durable")
    raise RuntimeError(f"KEEPCOUNT_BENCH_BACKEND must be one of {', '.join(BACKENDS)}: {backend!r}")


BACKEND = os.environ.get("KEEPCOUNT_BENCH_BACKEND", "none")
_metrics = _build(BACKEND)  # wraps app.wsgi_app in the backend's middleware first
app.wsgi_app = _Dispatch(app.wsgi_app, _metrics)  # type: ignore[method-assign]
