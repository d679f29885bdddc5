"""HTTP request metrics: what the ASGI and WSGI middleware count, and when they wait.

Both ``keepcount.asgi`` and ``keepcount.wsgi`` declare the same three
families on a registry (names shown for the default ``prefix="http"``):

- ``http_requests_total{method, route, status}``: a counter, one per
  response.
- ``http_request_errors_total{method, route}``: a counter of responses with
  a status >= 500 and of requests whose application raised; each request
  at most once.
- ``http_request_duration_seconds{method, route}``: a histogram of the time
  from receiving the request to the start of its response (see the
  middleware modules for exactly where that is).

Every label is bounded, so a scanner trying random paths and methods cannot
grow the families: ``method`` is one of the RFC 9110 methods (and PATCH) or
``OTHER``; ``route`` is the route *template* the framework matched
(``/items/{item_id}``, never ``/items/42``) or ``UNMATCHED``; ``status`` is
the three-digit status code.

``PendingBound`` decides, per response, whether the middleware must wait
for a commit before it lets the response start; with ``max_pending=0``
(durable mode) it always must.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence

from keepcount.errors import InvalidInput, KeepcountError
from keepcount.metrics import DEFAULT_BUCKETS
from keepcount.registry import Registry

__all__ = [
    "DEFAULT_MAX_PENDING",
    "KNOWN_METHODS",
    "OTHER_METHOD",
    "UNMATCHED",
    "HTTPMetrics",
    "PendingBound",
    "error_body",
    "method_label",
]

logger = logging.getLogger("keepcount.http")

UNMATCHED = "<unmatched>"
"""The route label of a request no route template is known for (404s,
requests rejected before routing, frameworks the middleware cannot read)."""

KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
OTHER_METHOD = "OTHER"

DEFAULT_MAX_PENDING = 1000
"""Responses that may start before their count is durable, in bounded-async
mode.  It is what a crash can lose beyond the durable mode's nothing, so keep
it small next to the traffic you count; it also caps how often the bound
forces a commit under load (at most once per that many responses, one store
write of a few hundred microseconds on SQLite, shared by every waiter)."""


def method_label(method: str) -> str:
    """The ``method`` label: the method itself if standard, else ``OTHER``.

    Methods are case-sensitive (RFC 9110), so ``get`` is ``OTHER`` too.
    """
    return method if method in KNOWN_METHODS else OTHER_METHOD


def error_body(exc: KeepcountError) -> bytes:
    """The JSON body of the 503 that replaces a response whose count is not durable."""
    message = (
        f"not acknowledged: the response could not be counted durably ({exc}); "
        "the request itself may have taken effect"
    )
    return json.dumps({"error": {"code": exc.code, "message": message}}).encode()


class HTTPMetrics:
    """The three request families of one middleware, declared on ``registry``.

    Declaring them again (a second middleware on the same registry, a
    restart) returns the same families, with their restored values.
    ``max_series`` overrides the registry's per-family label-set limit.
    """

    def __init__(
        self,
        registry: Registry,
        *,
        prefix: str = "http",
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        max_series: int | None = None,
    ) -> None:
        self.registry = registry
        self.requests = registry.counter(
            f"{prefix}_requests_total",
            "HTTP requests answered, by method, route template and status",
            ["method", "route", "status"],
            max_children=max_series,
        )
        self.errors = registry.counter(
            f"{prefix}_request_errors_total",
            "HTTP requests answered with a 5xx status or whose application raised",
            ["method", "route"],
            max_children=max_series,
        )
        self.duration = registry.histogram(
            f"{prefix}_request_duration_seconds",
            "Seconds from receiving an HTTP request to the start of its response",
            ["method", "route"],
            buckets=buckets,
            max_children=max_series,
        )

    def record(self, method: str, route: str, status: int, seconds: float, *, error: bool) -> bool:
        """Count one response in memory; False if a label set was refused.

        A refused label set (``CardinalityError``: a family is full; or a
        route template longer than label values may be) is logged and the
        response goes on uncounted: a metrics limit must not fail the
        application's requests.
        """
        try:
            self.requests.labels(method, route, status).inc()
            self.duration.labels(method, route).observe(seconds)
            if error:
                self.errors.labels(method, route).inc()
        except InvalidInput as exc:
            logger.error("keepcount: %s %s (status %s) not counted: %s", method, route, status, exc)
            return False
        return True

    def record_error(self, method: str, route: str) -> None:
        """Count an error of a request already counted (it raised after its response started)."""
        try:
            self.errors.labels(method, route).inc()
        except InvalidInput as exc:
            logger.error("keepcount: error of %s %s not counted: %s", method, route, exc)


class PendingBound:
    """How many counted responses may start before their counts are durable.

    Each counted response calls ``counted()`` right after its ``inc()``; it
    returns None if the response may start at once, or a mark if it must
    first wait for a commit, and then report the commit with
    ``committed(mark)``.  Responses are numbered in the order they call
    ``counted()``; a commit called after response ``n`` got its number
    covers responses ``1..n`` (their ``inc()`` came before), so the
    responses not yet known durable are those numbered above the highest
    reported mark ``d``.  A response numbered ``n`` starts without waiting
    only if ``n - d' <= max_pending`` for the ``d' <= d`` it saw, so:

    **At any time, at most ``max_pending`` responses counted through this
    bound have started while their count was not yet durable.**

    ``max_pending=0`` is durable mode: every response waits.  The bound is
    conservative: commits made by others (the application's own, the
    registry's background flush) make counts durable without moving ``d``.
    Thread-safe, for WSGI servers' worker threads.
    """

    def __init__(self, max_pending: int) -> None:
        if max_pending.__class__ is not int or max_pending < 0:
            raise InvalidInput(f"max_pending must be a non-negative int, got {max_pending!r}")
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._counted = 0
        self._durable = 0

    def counted(self) -> int | None:
        with self._lock:
            self._counted += 1
            if self._counted - self._durable > self.max_pending:
                return self._counted
            return None

    def committed(self, mark: int) -> None:
        with self._lock:
            self._durable = max(self._durable, mark)

    @property
    def pending(self) -> int:
        """Counted responses not known to be durable (an upper bound)."""
        return self._counted - self._durable
