"""The HTTP node: one registry behind a Starlette app (DESIGN §3 "HTTP (one node)").

Example::

    import uvicorn
    from keepcount.node import NodeConfig, create_app

    app = create_app(NodeConfig(node="node-1", store="sqlite:////var/lib/app/c.db"))
    uvicorn.run(app, host="127.0.0.1", port=8101, lifespan="on")

Life of a node:

1. **Serving at once.** The lifespan starts and the app answers HTTP right
   away: ``/healthz`` is 200, ``/readyz`` 503 (``not_ready``), every data
   endpoint 503.  A background task claims the node id and restores its
   values (``keepcount.open``, in a thread: it blocks).
2. **Claim.** With a coordinator (``NodeConfig.coordinator``, etcd or
   ZooKeeper) the node first claims its id there (a lease / an ephemeral
   node, kept alive by the coordinator client's own thread) and gets an
   epoch that only grows; the store then records that epoch, which fences
   every older incarnation's writes.  Without one, the store issues the
   epoch and holds a lock (SQLite: a ``flock``).  If another live process
   holds the id (``ClaimConflict``), the coordinator or the store cannot be
   reached (``CoordinatorUnavailable``, ``StoreUnavailable``), the task
   retries with a backoff for up to ``claim_timeout`` seconds.  A
   ``CorruptStore``, an invalid URL, a store that already holds a newer
   epoch (``Fenced``), any other error, or running out of time is *fatal*:
   the node never turns ready, the message is logged and kept in
   ``Node.fatal``, and ``on_fatal`` is called.  The CLI's ``on_fatal`` sets
   uvicorn's ``server.should_exit``; once the server has stopped, the CLI
   sees ``Node.fatal`` and exits with ``Node.exit_code``.
3. **Ready.** ``/readyz`` is 200 while the registry is open, not fenced, and
   the claim is *trusted*: with a coordinator, until the local deadline of
   the last renewal (its send time + TTL - a margin), which passes before
   the coordinator can let the lease expire.  So a node cut off from the
   coordinator, or paused (SIGSTOP) past its TTL, stops acknowledging before
   anyone else can take its id: an increment made durable after that is
   answered 503 ``claim_lost`` (not acknowledged; a retry with the same
   ``Idempotency-Key`` is counted once).  If renewals succeed again in time
   the node serves again.  Once the claim is *lost* (the coordinator says
   so) or the store fenced this incarnation, it never serves again: it
   stops with ``exit_code`` 3 so that a supervisor starts a new
   incarnation.
4. **Shutdown** (lifespan end: uvicorn stopped accepting and let the requests
   in flight finish): ``registry.aclose()`` flushes everything and releases
   the store claim, then the coordinator claim is released.  A final flush
   error is kept in ``Node.close_error``.

Requests: ``POST /v1/counters/{name}/increment`` answers 200 only after the
increment is durable (``Registry.increment``); concurrent requests share one
group commit.  Any error, anywhere (Starlette's own 404/405 and unexpected
exceptions included), is ``{"error": {"code", "message"}}`` with a stable
code, and an error answer never changes anything.  The document of the API is
``keepcount.openapi.OPENAPI``, served at ``/openapi.json``.

The increment path is kept lean on purpose (a plain ASGI endpoint, one JSON
decode, no models, no middleware of its own): the benchmark holds durable increments to
a no-op endpoint on the same stack, which ``create_app(config,
routes=[...])`` provides without putting it in the product API.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from prometheus_client.utils import floatToGoString
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

import keepcount
from keepcount.commit import DEFAULT_FLUSH_INTERVAL, DEFAULT_IDEMPOTENCY_TTL
from keepcount.coordination.base import DEFAULT_TTL
from keepcount.errors import (
    ClaimConflict,
    ClaimError,
    CoordinatorUnavailable,
    InvalidInput,
    KeepcountError,
    RegistryClosed,
    StoreError,
    StoreUnavailable,
)
from keepcount.exposition import render
from keepcount.metrics import (
    DEFAULT_MAX_CHILDREN,
    MAX_VALUE,
    Counter,
    HistogramValue,
    MetricFamily,
)
from keepcount.naming import check_label_names, check_metric_name, check_node_id, label_value
from keepcount.openapi import DEFAULT_HELP, MAX_HELP_LENGTH, OPENAPI
from keepcount.registry import Receipt, Registry
from keepcount.stores.base import is_native_kind
from keepcount.totals import SeriesTotal, cluster_totals
from keepcount.ui import STATE_PATH, TimedCache, Transitions, asset_routes, node_state
from keepcount.ui import series_counters as ui_counters

if TYPE_CHECKING:
    from keepcount.coordination.base import Claim, Coordinator
    from keepcount.stores.base import NodeRecord

__all__ = [
    "DEFAULT_CLAIM_TIMEOUT",
    "DEFAULT_CLAIM_TTL",
    "DEFAULT_HELP",
    "EXIT_CLAIM_LOST",
    "DEFAULT_MAX_BODY",
    "MAX_HELP_LENGTH",
    "HTTPError",
    "Node",
    "NodeConfig",
    "create_app",
]

log = logging.getLogger("keepcount.node")

DEFAULT_MAX_BODY = 64 * 1024
"""Bytes of request body accepted.  An increment body is a few hundred bytes;
the limit only has to stop a client from making the node buffer megabytes."""

DEFAULT_CLAIM_TIMEOUT = 30.0
"""Seconds a starting node retries a held claim (or an unreachable store)
before it gives up and exits.  Long enough for an overlapping predecessor's
graceful shutdown (uvicorn's drain, then a final flush); a *killed*
predecessor's lock is already gone."""

DEFAULT_CLAIM_TTL = DEFAULT_TTL
"""Seconds a coordinator keeps the claim of a node that stopped renewing it
(killed, paused, cut off): see ``keepcount.coordination.DEFAULT_TTL``.  It
bounds how long a node id is unavailable after its host is lost; a *killed*
node's claim is evicted at once by the failure detector, which saw the
process exit."""

EXIT_CLAIM_LOST = 3
"""Exit status of a node that lost its claim (or was fenced) while serving: a
supervisor should start a new incarnation."""

RETRY_AFTER = "1"
"""Seconds a client should wait before retrying a 503 (sent as Retry-After)."""

_WATCH_INTERVAL = 0.05  # seconds between checks for a lost claim while serving
_UI_READ_EVERY = 0.5  # seconds: /ui reads the store at most this often, whatever the pages
_CLAIM_BACKOFF = (0.05, 1.0)  # first and largest wait between claim attempts, seconds
_KEY = re.compile(r"[!-~]{1,255}")  # Idempotency-Key (and token): printable ASCII, no spaces
_KEY_BYTES = re.compile(rb"[!-~]{1,255}")
_JSON_HEADERS = {"content-type": "application/json"}
_RETRY = {"retry-after": RETRY_AFTER}
_FIELDS = frozenset(("labels", "by", "help"))
_HELP_CHARS = re.compile(r"[^\x00-\x1f\x7f-\x9f]*")  # no control characters (C0, DEL, C1)
_EMPTY: dict[str, Any] = {}
# Built once: json.dumps with options builds a new encoder per call.  Output is ASCII.
_encode = json.JSONEncoder(separators=(",", ":")).encode
_canonical = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode
_decode = json.JSONDecoder().decode
# How prometheus_client writes a bucket bound ("0.005", "1.0", "+Inf"): the same keys as /metrics.
_bound = cast(Callable[[float], str], floatToGoString)


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """What a node serves and how; validated on construction (``InvalidInput``).

    ``flush_interval``: seconds between background flushes (increments made
    through HTTP are durable before they are answered either way);
    ``max_children``: label sets per family (None: unlimited);
    ``claim_timeout``: see ``DEFAULT_CLAIM_TIMEOUT``.
    """

    node: str
    store: str
    token: str | None = None
    idempotency_ttl: float = DEFAULT_IDEMPOTENCY_TTL
    max_body: int = DEFAULT_MAX_BODY
    flush_interval: float | None = DEFAULT_FLUSH_INTERVAL
    max_children: int | None = DEFAULT_MAX_CHILDREN
    claim_timeout: float = DEFAULT_CLAIM_TIMEOUT
    coordinator: str | None = None
    """``etcd://...`` or ``zookeeper://...``: claim the id there (see the module docstring)."""
    claim_ttl: float = DEFAULT_CLAIM_TTL
    """Seconds the coordinator keeps a claim whose holder stopped renewing it."""
    advertise: str | None = None
    """The node's URL, published with its claim for the cluster tooling."""
    unsafe_ack_before_durable: bool = False
    """**A deliberately broken node, for testing the verifier only**: answer
    increments as soon as they are in memory (ignoring idempotency keys), as
    a counter library without durability would.  ``keepcount verify`` must
    find the acknowledged increments such a node loses when it is killed."""

    def __post_init__(self) -> None:
        check_node_id(self.node)
        if not isinstance(self.store, str) or "://" not in self.store:
            raise InvalidInput(f"invalid store URL {self.store!r}: expected scheme://...")
        if self.token is not None and not _KEY.fullmatch(self.token):
            raise InvalidInput("the token must be 1-255 printable ASCII characters (no spaces)")
        if not self.idempotency_ttl > 0:
            raise InvalidInput(f"idempotency_ttl must be positive, not {self.idempotency_ttl}")
        if type(self.max_body) is not int or self.max_body < 1:
            raise InvalidInput(f"max_body must be a positive number of bytes, not {self.max_body}")
        if self.flush_interval is not None and not self.flush_interval > 0:
            raise InvalidInput(f"flush_interval must be positive, not {self.flush_interval}")
        if self.max_children is not None and self.max_children < 1:
            raise InvalidInput(f"max_children must be at least 1, not {self.max_children}")
        if not self.claim_timeout >= 0:
            raise InvalidInput(f"claim_timeout must not be negative, not {self.claim_timeout}")
        if self.coordinator is not None and "://" not in self.coordinator:
            raise InvalidInput(
                f"invalid coordinator URL {self.coordinator!r}: expected scheme://..."
            )
        if not self.claim_ttl > 0:
            raise InvalidInput(f"claim_ttl must be positive, not {self.claim_ttl}")


class HTTPError(Exception):
    """An error answer: ``{"error": {"code", "message"}}`` with ``status``."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    body = _encode({"error": {"code": code, "message": message}})
    if status == 503:
        headers = {**_RETRY, **(headers or {})}
    return Response(body.encode(), status, headers, "application/json")


def _json(data: object, headers: dict[str, str] = _JSON_HEADERS) -> Response:
    # ensure_ascii (the default): the body is ASCII whatever the input held.
    return Response(_encode(data).encode(), 200, headers)


class Node:
    """The state of one node and its endpoints; ``create_app`` wires it up.

    ``registry`` is None until the claim and restore succeeded.  ``fatal``
    says why the node will never serve (the process should exit non-zero);
    ``close_error`` why its final flush failed.
    """

    def __init__(
        self,
        config: NodeConfig,
        *,
        on_ready: Callable[[Node], None] | None = None,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.registry: Registry | None = None
        self.fatal: str | None = None
        self.close_error: str | None = None
        self.waiting: str | None = None
        """Why the claim is still being retried (for /readyz), if it is."""
        self.restoring_since: float | None = None
        """Wall-clock time this node began claiming its id and restoring."""
        self.ready_at: float | None = None
        """Wall-clock time it was restored and began serving."""
        self.exit_code = 1
        """With ``fatal``: 1 if the node never served, ``EXIT_CLAIM_LOST`` if it lost its claim."""
        self.claim: Claim | None = None
        self._coordinator: Coordinator | None = None
        self.on_ready = on_ready
        self.on_fatal = on_fatal
        self._stopping = False
        self._stop: asyncio.Event | None = None
        self._auth = None if config.token is None else b"Bearer " + config.token.encode()
        # The live page (GET /ui): this node's uptime, its state changes, one store read at a time.
        self._ui_started = time.monotonic()
        self._ui_transitions = Transitions()
        self._ui_read = TimedCache(_UI_READ_EVERY)

    # -- lifecycle ---------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        # A server runs the lifespan once; a test harness may run it again:
        # each run is a new incarnation (a new claim, a higher epoch).
        self._reset()
        self._stop = asyncio.Event()
        opener = asyncio.create_task(self._open(), name=f"keepcount-open-{self.config.node}")
        try:
            yield
        finally:
            self._stopping = True
            self._stop.set()
            # Not cancelled: a claim taken in the thread must be seen and released.
            await opener
            if self.registry is not None:
                try:
                    await self.registry.aclose()
                except KeepcountError as exc:
                    if not self.registry.fenced:
                        self.close_error = str(exc)
                        log.error("node %s: final flush failed: %s", self.config.node, exc)
            await asyncio.to_thread(self._release_claim)

    def _release_claim(self) -> None:
        claim, coordinator = self.claim, self._coordinator
        self._coordinator = None
        try:
            if claim is not None:
                claim.release()
        except KeepcountError as exc:  # it runs out by itself: the TTL
            log.warning("node %s: releasing the claim failed: %s", self.config.node, exc)
        finally:
            if coordinator is not None:
                coordinator.close()

    def _reset(self) -> None:
        self.registry = None
        self.claim = None
        self.fatal = self.close_error = self.waiting = None
        self.exit_code = 1
        self._stopping = False

    async def _open(self) -> None:
        cfg = self.config
        self.restoring_since = time.time()
        self._ui_transitions.observe(cfg.node, "restoring", self.restoring_since)
        deadline = time.monotonic() + cfg.claim_timeout
        delay = _CLAIM_BACKOFF[0]
        epoch: int | None = None
        while True:
            try:
                if cfg.coordinator is not None and (self.claim is None or self.claim.lost):
                    epoch = await asyncio.to_thread(self._claim_id)
                registry = await asyncio.to_thread(
                    keepcount.open,
                    cfg.store,
                    cfg.node,
                    flush_interval=cfg.flush_interval,
                    max_children=cfg.max_children,
                    idempotency_ttl=cfg.idempotency_ttl,
                    epoch=epoch,
                    max_slots=1,  # a node process serves its id itself, never a slot of it
                )
            except (ClaimConflict, StoreUnavailable, CoordinatorUnavailable) as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._fail(f"gave up after {cfg.claim_timeout:g} s: {exc}")
                    return
                if self.waiting is None:
                    log.warning(
                        "node %s: %s; retrying for up to %g s", cfg.node, exc, cfg.claim_timeout
                    )
                self.waiting = str(exc)
                assert self._stop is not None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), min(delay, left))
                if self._stopping:
                    return
                delay = min(delay * 2, _CLAIM_BACKOFF[1])
                continue
            except Exception as exc:  # CorruptStore, a bad URL, Fenced, a bug: never serve
                if not isinstance(exc, KeepcountError):
                    log.exception("node %s: cannot open the store", cfg.node)
                self._fail(str(exc))
                return
            self.registry = registry
            self.waiting = None
            self.ready_at = time.time()
            if self._stopping:
                return
            self.ui_observe()  # the moment it turned ready, for the live page
            if self.on_ready is not None:
                self.on_ready(self)
            await self._watch()
            return

    def _claim_id(self) -> int:
        """Claim the id in the coordinator (in a thread: it blocks); the epoch."""
        from keepcount.coordination import open_coordinator

        cfg = self.config
        if self._coordinator is None:
            self._coordinator = open_coordinator(cfg.coordinator or "")
        info = {"pid": str(os.getpid()), "host": socket.gethostname()}
        if cfg.advertise is not None:
            info["url"] = cfg.advertise
        self.claim = self._coordinator.claim(cfg.node, info, ttl=cfg.claim_ttl)
        return self.claim.epoch

    async def _watch(self) -> None:
        """While serving: stop for good once the claim is lost or the store
        fenced this incarnation (a new one holds the id, or soon will)."""
        assert self._stop is not None and self.registry is not None
        while not self._stopping:
            reg, claim = self.registry, self.claim
            if reg.fenced:
                why = "the store holds a newer incarnation of this node id (fenced)"
            elif claim is not None and claim.lost:
                why = "the coordinator no longer holds its claim (lease or session expired)"
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), _WATCH_INTERVAL)
                continue
            self.exit_code = EXIT_CLAIM_LOST
            self._fail(why)
            return

    def _fail(self, message: str) -> None:
        self.fatal = message
        log.error("node %s: cannot serve: %s", self.config.node, message)
        self.ui_observe()
        if self.on_fatal is not None:
            self.on_fatal(message)

    def ready(self) -> Registry | None:
        """The registry if the node may serve now: restored, claim held and
        trusted, not closing."""
        reg = self.registry
        if reg is None or self._stopping or reg.fenced or reg.closed or self.fatal is not None:
            return None
        if self.claim is not None and not self.claim.trusted():
            return None
        return reg

    def _not_ready(self) -> HTTPError:
        node, reg = self.config.node, self.registry
        if self.fatal is not None:
            why = f"node {node} cannot serve: {self.fatal}"
        elif self._stopping or (reg is not None and reg.closed):
            why = f"node {node} is shutting down"
        elif reg is None:
            why = f"node {node} is claiming its id and restoring its counters"
            if self.waiting is not None:
                why += f" (waiting: {self.waiting})"
        elif reg.fenced:
            why = f"node {node} lost its claim: a newer incarnation holds it"
        else:
            why = (
                f"node {node} cannot vouch for its claim: the coordinator has not "
                "confirmed it in time (unreachable, or this process was paused)"
            )
        return HTTPError(503, "not_ready", why)

    def _registry(self) -> Registry:
        reg = self.ready()
        if reg is None:
            raise self._not_ready()
        return reg

    # -- probes and documents ----------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return _json({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        reg = self._registry()
        return _json(
            {
                "status": "ready",
                "node": reg.node,
                "epoch": reg.epoch,
                "restored_series": reg.restored_series,
                "restore_seconds": round(reg.restore_seconds, 6),
                "restoring_since": self.restoring_since,
                "ready_at": self.ready_at,
                "claim_expires_in": (
                    None
                    if self.claim is None
                    else round(max(self.claim.deadline() - time.monotonic(), 0.0), 3)
                ),
            }
        )

    async def openapi(self, request: Request) -> Response:
        return Response(_OPENAPI_BYTES, 200, _JSON_HEADERS)

    async def metrics(self, request: Request) -> Response:
        reg = self._registry()
        # Memory only, but a big registry takes a while: keep the loop free.
        body, content_type = await asyncio.to_thread(render, reg, request.headers.get("accept"))
        return Response(body, 200, {"content-type": content_type})

    # -- increments ----------------------------------------------------------------

    async def increment(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /v1/counters/{name}/increment``: the hot path, so a plain ASGI
        endpoint (no Request/Response objects, one pass over the headers).
        Errors are raised and answered by the app's exception handlers."""
        auth = key = ctype = length = None
        for k, v in scope["headers"]:
            if k == b"content-type":
                ctype = v
            elif k == b"content-length":
                length = v
            elif k == b"idempotency-key":
                key = v
            elif k == b"authorization":
                auth = v
        if self._auth is not None and (auth is None or not hmac.compare_digest(auth, self._auth)):
            raise HTTPError(
                401,
                "unauthorized",
                "this node requires 'Authorization: Bearer <token>' for writes",
                {"www-authenticate": "Bearer"},
            )
        if key is not None and not _KEY_BYTES.fullmatch(key):
            raise HTTPError(
                400,
                "invalid_idempotency_key",
                "Idempotency-Key must be 1-255 printable ASCII characters (no spaces)",
            )
        body = await self._body(receive, length)
        if body:
            if ctype != b"application/json" and (
                ctype is None or ctype.split(b";", 1)[0].strip().lower() != b"application/json"
            ):
                given = "no Content-Type" if ctype is None else ctype.decode("latin-1")
                raise HTTPError(
                    415, "unsupported_media_type", f"the body must be application/json, not {given}"
                )
            data = _parse(body)
            labels = data.get("labels", _EMPTY)
            by = data.get("by", 1)
            help_ = data.get("help")
            if not _FIELDS.issuperset(data):
                unknown = sorted(set(data) - _FIELDS)
                raise HTTPError(
                    422, "invalid_input", f"unknown field(s) {unknown}; expected labels, by, help"
                )
            if help_ is not None or "help" in data:  # "help": null is refused too
                _check_help(help_)
        else:
            labels, by, help_ = _EMPTY, 1, None
        if type(labels) is not dict or not all(type(v) is str for v in labels.values()):
            raise HTTPError(
                422, "invalid_input", 'labels must be an object of strings, e.g. {"route": "/"}'
            )
        if type(by) is not int or not 0 <= by <= MAX_VALUE:
            raise HTTPError(
                422, "invalid_amount", f"by must be an integer from 0 to 2**63-1, not {_show(by)}"
            )
        name: str = scope["path_params"]["name"]

        reg = self.ready()
        family = reg.get(name) if reg is not None else None
        if family is None:
            # First use: everything is checked before the family is declared,
            # so a refused request declares nothing.
            check_metric_name(name)
            labelnames = check_label_names(sorted(labels))
            for n in labelnames:
                label_value(n, labels[n])
            if reg is None:
                raise self._not_ready()
            family = reg.counter(name, help_ or DEFAULT_HELP, labelnames=labelnames)
        assert reg is not None  # a family was found in it
        if not isinstance(family, Counter) or family.kind != "counter":
            raise HTTPError(
                422,
                "definition_conflict",
                f"{name} is a {family.kind}, not a counter: it cannot be incremented",
            )
        names = family.labelnames
        if len(labels) != len(names) or not all(n in labels for n in names):
            check_label_names(sorted(labels))  # an invalid name is invalid_input first
            raise HTTPError(
                422,
                "definition_conflict",
                f"{name} has the labels {sorted(names)}; got {sorted(labels)}",
            )
        child = family.labels(*[labels[n] for n in names]) if names else family.labels()
        if child.value + by > MAX_VALUE:
            raise HTTPError(
                422,
                "invalid_amount",
                f"{name}{labels}: the value would pass 2**63-1; increment refused",
            )
        if self.config.unsafe_ack_before_durable:
            child.inc(by)  # the mutant: acknowledged before it is durable
            receipt = Receipt(reg.node, name, dict(labels), child.value)
        elif key is None:
            receipt = await reg.increment(child, by)
        else:
            request = _canonical({"name": name, "labels": labels, "by": by})
            fingerprint = hashlib.sha256(request.encode()).hexdigest()
            receipt = await reg.increment(
                child, by, key=key.decode("ascii"), fingerprint=fingerprint
            )
        if self.claim is not None and not self.claim.trusted():
            # Durable, but this node can no longer vouch that it alone holds
            # the id: not acknowledged (a keyed retry is counted once).
            raise HTTPError(
                503,
                "claim_lost",
                f"node {self.config.node} lost the certainty of its claim before answering; "
                "not acknowledged (retry with the same Idempotency-Key)",
            )
        if help_ and help_ != family.help and not receipt.replayed:
            # A new help replaces the family's, as Registry.counter() does on a
            # redeclaration; only once the increment is acknowledged (an error
            # answer changes nothing).  Stored by the next flush.
            with contextlib.suppress(KeepcountError):  # closing: the count stands
                reg.counter(name, help_, labelnames=names)
        payload = _encode(
            {
                "node": receipt.node,
                "name": receipt.name,
                "labels": receipt.labels,
                "value": receipt.value,
                "durable": True,
            }
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(payload)),
        ]
        if receipt.replayed:
            headers.append((b"idempotency-replayed", b"true"))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    async def _body(self, receive: Receive, length: bytes | None) -> bytes:
        """The whole body, refused with 413 as soon as it passes ``max_body``
        (by Content-Length, or while reading a chunked one)."""
        limit = self.config.max_body
        if length is not None and length.isdigit() and int(length) > limit:
            raise _too_large(limit)
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise ClientDisconnect()
            chunk = message.get("body", b"")
            if chunk:
                body = body + chunk if body else chunk
                if len(body) > limit:
                    raise _too_large(limit)
            if not message.get("more_body", False):
                return body

    # -- reading -------------------------------------------------------------------

    async def counters(self, request: Request) -> Response:
        name = request.path_params.get("name")
        if name is not None:
            check_metric_name(name)
        reg = self._registry()
        if name is None:
            families = [f for f in reg.families() if is_native_kind(f.kind)]
        else:
            family = reg.get(name)
            if family is None:
                raise HTTPError(404, "not_found", f"node {reg.node} has no metric {name}")
            if not is_native_kind(family.kind):
                raise HTTPError(
                    404,
                    "not_found",
                    f"{name} is a {family.kind}: this API serves counters and histograms only",
                )
            families = [family]
        series = await asyncio.to_thread(_local, families)
        return _json({"node": reg.node, "counters": series})

    async def cluster(self, request: Request) -> Response:
        name = request.path_params.get("name")
        if name is not None:
            check_metric_name(name)
        reg = self._registry()
        totals = await asyncio.to_thread(reg.cluster, name)
        if name is not None and not totals:
            raise HTTPError(404, "not_found", f"no node of the store has a series of {name}")
        return _json({"counters": _cluster(totals)})

    # -- the live page ---------------------------------------------------------------

    def ui_status(self) -> tuple[str, str | None]:
        """This node's state as the live page shows it (``keepcount.ui.NODE_STATES``),
        and why it is not ready."""
        if self.ready() is not None:
            return "ready", None
        reg = self.registry
        why = self._not_ready().message
        fenced = (reg is not None and reg.fenced) or (
            self.fatal is not None and self.exit_code == EXIT_CLAIM_LOST
        )
        if fenced:
            return "fenced", why
        if self.fatal is not None or self._stopping or (reg is not None and reg.closed):
            return "down", why
        if reg is None:
            return "restoring", why
        return "unconfirmed", why

    def ui_observe(self) -> tuple[str, str | None]:
        """``ui_status()``, recorded in this node's state changes for the page."""
        state, detail = self.ui_status()
        self._ui_transitions.observe(self.config.node, state, time.time())
        return state, detail

    async def ui_state(self, request: Request) -> Response:
        """``GET /ui/state.json`` (``keepcount.ui.state``): this node, the store's
        other node ids, the cluster totals.  Served while not ready too (an
        operator wants to watch a node restore); off the increment path: the
        store is read in a thread, at most every ``_UI_READ_EVERY`` seconds."""
        state, detail = self.ui_observe()
        reg = self.registry
        read: _UIRead | str | None = None
        if reg is not None and not reg.closed:
            read = await self._ui_read.get(lambda: asyncio.to_thread(_read_for_ui, reg))
        epoch = reg.epoch if reg is not None else (self.claim.epoch if self.claim else None)
        common: dict[str, Any] = {
            "detail": detail,
            "epoch": epoch,
            "uptime": time.monotonic() - self._ui_started,
            "pid": os.getpid(),
            "transitions": self._ui_transitions,
        }
        if isinstance(read, _UIRead):
            doc = node_state(
                self.config.node, state, records=read.records, counters=read.counters,
                truncated=read.truncated, counters_time=read.time, **common,
            )  # fmt: skip
        else:
            doc = node_state(self.config.node, state, counters_error=read, **common)
        return Response(_encode(doc).encode(), 200, _UI_STATE_HEADERS)

    # -- errors --------------------------------------------------------------------

    async def on_http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPError)
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    async def on_keepcount_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, KeepcountError)
        if isinstance(exc, InvalidInput):
            return error_response(422, exc.code, str(exc))
        if isinstance(exc, RegistryClosed):
            return error_response(503, "not_ready", f"node {self.config.node} is shutting down")
        if isinstance(exc, StoreError | ClaimError):
            return error_response(503, exc.code, f"not acknowledged: {exc}")
        return error_response(503, exc.code, str(exc))

    async def on_starlette_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = exc.detail
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return error_response(exc.status_code, code, message, exc.headers)

    async def on_disconnect(self, request: Request, exc: Exception) -> Response:
        # The client left while sending its body: nothing was counted, nobody reads this.
        return error_response(400, "client_disconnected", "the client closed the connection")

    async def on_unexpected(self, request: Request, exc: Exception) -> Response:
        # Starlette's ServerErrorMiddleware logs the exception after this answer.
        return error_response(500, "internal_error", f"internal error ({type(exc).__name__})")


def _parse(body: bytes) -> dict[str, Any]:
    try:
        data = _decode(body.decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise HTTPError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None
    except ValueError as exc:  # an integer of thousands of digits
        raise HTTPError(
            422, "invalid_amount", f"a number in the body is too large: {exc}"
        ) from None
    if type(data) is not dict:
        raise HTTPError(400, "malformed_json", "the body must be a JSON object")
    return data


def _check_help(help_: object) -> None:
    """Refuse an increment's ``help`` that is not short, printable text."""
    if type(help_) is not str:
        raise HTTPError(422, "invalid_input", f"help must be a string, not {_show(help_)}")
    if len(help_) > MAX_HELP_LENGTH:
        raise HTTPError(422, "invalid_input", f"help is longer than {MAX_HELP_LENGTH} characters")
    if not _HELP_CHARS.fullmatch(help_):
        raise HTTPError(
            422, "invalid_input", "help must not hold control characters (newlines, tabs, ...)"
        )
    if not help_.isascii():
        try:  # a lone surrogate (JSON "\\ud800") could never be stored
            help_.encode("utf-8")
        except UnicodeEncodeError:
            raise HTTPError(
                422, "invalid_input", "help is not valid Unicode text (it holds a lone surrogate)"
            ) from None


def _too_large(limit: int) -> HTTPError:
    return HTTPError(413, "body_too_large", f"the body is larger than {limit} bytes")


def _show(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _value(value: int | HistogramValue, buckets: Sequence[float]) -> Any:
    if isinstance(value, int):
        return value
    return {
        "count": value.count,
        "sum": value.sum,
        "buckets": {_bound(b): c for b, c in zip(buckets, value.cumulative(), strict=True)},
    }


def _local(families: Iterable[MetricFamily[Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for family in sorted(families, key=lambda f: f.name):
        name, kind, names = family.name, family.kind, family.labelnames
        buckets: Sequence[float] = getattr(family, "buckets", ())
        for values, value, _created in sorted(family.series(), key=lambda s: s[0]):
            out.append(
                {
                    "name": name,
                    "kind": kind,
                    "labels": dict(zip(names, values, strict=True)),
                    "value": _value(value, buckets),
                }
            )
    return out


def _cluster(totals: Iterable[SeriesTotal]) -> list[dict[str, Any]]:
    return [
        {
            "name": t.name,
            "kind": t.kind,
            "labels": t.labels,
            "value": _value(t.value, t.buckets),
            "nodes": {node: _value(v, t.buckets) for node, v in sorted(t.nodes.items())},
        }
        for t in totals
    ]


_OPENAPI_BYTES = _encode(OPENAPI).encode()
_UI_STATE_HEADERS = {"content-type": "application/json", "cache-control": "no-store"}


@dataclass(frozen=True, slots=True)
class _UIRead:
    """What the live page needs from the store, read at ``time``."""

    time: float
    records: list[NodeRecord]
    counters: list[dict[str, Any]]
    truncated: int


def _read_for_ui(reg: Registry) -> _UIRead | str:
    """The store's node records and cluster totals for ``GET /ui/state.json``
    (in a thread: it reads the store); a message if the store failed."""
    started = time.time()
    try:
        snapshot = reg.store.read_cluster()
        records = reg.store.nodes()
    except KeepcountError as exc:
        return f"reading the store failed: {exc}"
    helps: dict[str, str] = {}
    for families in snapshot.families.values():
        for name, definition in families.items():
            if definition.help and name not in helps:
                helps[name] = definition.help
    counters, truncated = ui_counters(cluster_totals(snapshot), helps)
    return _UIRead(started, records, counters, truncated)


class _ASGIEndpoint:
    """Marks a method as a plain ASGI endpoint: ``Route`` would wrap a method
    as a request/response handler."""

    __slots__ = ("call",)

    def __init__(self, call: ASGIApp) -> None:
        self.call = call

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.call(scope, receive, send)


def create_app(
    config: NodeConfig,
    *,
    routes: Sequence[BaseRoute] = (),
    on_ready: Callable[[Node], None] | None = None,
    on_fatal: Callable[[str], None] | None = None,
) -> Starlette:
    """The node's ASGI app; its ``Node`` is ``app.state.node``.

    ``routes`` are mounted before the API's own (the benchmark's no-op
    endpoint: the same app, stack and error handling, outside the product
    API).  ``on_ready(node)`` runs once the node is restored and holds its
    claim; ``on_fatal(message)`` when it never will (see the module
    docstring).
    """

    node = Node(config, on_ready=on_ready, on_fatal=on_fatal)
    api = [
        Route("/v1/counters/{name}/increment", _ASGIEndpoint(node.increment), methods=["POST"]),
        Route("/v1/counters", node.counters, methods=["GET"]),
        Route("/v1/counters/{name}", node.counters, methods=["GET"]),
        Route("/v1/cluster/counters", node.cluster, methods=["GET"]),
        Route("/v1/cluster/counters/{name}", node.cluster, methods=["GET"]),
        Route("/metrics", node.metrics, methods=["GET"]),
        Route("/healthz", node.healthz, methods=["GET"]),
        Route("/readyz", node.readyz, methods=["GET"]),
        Route("/openapi.json", node.openapi, methods=["GET"]),
        Route(STATE_PATH, node.ui_state, methods=["GET"]),
        *asset_routes(),
    ]
    app = Starlette(
        routes=[*routes, *api],
        lifespan=node.lifespan,
        exception_handlers={
            HTTPError: node.on_http_error,
            KeepcountError: node.on_keepcount_error,
            HTTPException: node.on_starlette_error,
            ClientDisconnect: node.on_disconnect,
            Exception: node.on_unexpected,
        },
    )
    app.state.node = node
    return app
