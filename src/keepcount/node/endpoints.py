"""The node's endpoints: ``Node``, a ``Lifecycle`` that answers HTTP.

Thin: a request is decoded and validated by the body types
(``keepcount.node.bodies``), names and labels by ``keepcount.naming``,
readiness is ``Lifecycle.state``, and every refusal is an ``HTTPError`` (or
a ``KeepcountError``) that the app's exception handlers answer
(``keepcount.node.errors``).

The increment path is kept lean on purpose (a plain ASGI endpoint, one
msgspec decode, no Request/Response objects, no middleware of its own): the
benchmark holds durable increments to a no-op endpoint on the same stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import msgspec
from prometheus_client.utils import floatToGoString
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from keepcount.errors import ErrorCode, KeepcountError
from keepcount.exposition import render
from keepcount.metrics import MAX_VALUE, Counter, HistogramValue, MetricFamily
from keepcount.naming import check_label_names, check_metric_name, label_value
from keepcount.node.bodies import (
    DEFAULT_HELP,
    ClusterCounters,
    ClusterSeries,
    Health,
    IncrementResult,
    NodeCounters,
    Ready,
    Series,
    SettleResult,
    decode_increment,
)
from keepcount.node.bodies import HistogramValue as HistogramBody
from keepcount.node.config import KEY_PATTERN, NodeConfig
from keepcount.node.errors import HTTPError
from keepcount.node.lifecycle import Lifecycle, NodeState
from keepcount.node.live import LivePage
from keepcount.node.openapi import OPENAPI
from keepcount.registry import Receipt, Registry, receipt_of
from keepcount.settle import Settlement, SettleStatus, is_refusal
from keepcount.stores.base import is_native_kind
from keepcount.totals import SeriesTotal

__all__ = ["Node"]

_KEY_BYTES = re.compile(KEY_PATTERN.encode())
_KEY_TEXT = re.compile(KEY_PATTERN)
_JSON_HEADERS = {"content-type": "application/json"}
_EMPTY: dict[str, str] = {}
_UNVOUCHED = (NodeState.UNREADY, NodeState.FENCED)
_encode = msgspec.json.Encoder().encode
# Built once: json.dumps with options builds a new encoder per call.
_canonical = json.JSONEncoder(separators=(",", ":"), sort_keys=True).encode
# How prometheus_client writes a bucket bound ("0.005", "1.0", "+Inf"): the same keys as /metrics.
_bound = cast(Callable[[float], str], floatToGoString)
_OPENAPI_BYTES = _encode(OPENAPI)
_HEALTH_BYTES = _encode(Health(status="ok"))


def _json(body: msgspec.Struct) -> Response:
    return Response(_encode(body), 200, _JSON_HEADERS)


class Node(Lifecycle):
    """One node: its lifecycle (``Lifecycle``) and its endpoints; ``create_app`` wires it up."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        on_ready: Callable[[Node], None] | None = None,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(config, on_ready=on_ready, on_fatal=on_fatal)
        self._auth = None if config.token is None else b"Bearer " + config.token.encode()
        self.live = LivePage(self)

    def ready(self) -> Registry | None:
        """The registry if the node may serve now (``state`` is READY)."""
        return self.serving()

    def _registry(self) -> Registry:
        reg = self.serving()
        if reg is None:
            raise self.not_ready()
        return reg

    # -- probes and documents ----------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return Response(_HEALTH_BYTES, 200, _JSON_HEADERS)

    async def readyz(self, request: Request) -> Response:
        reg = self._registry()
        claim = self.claim
        return _json(
            Ready(
                status="ready",
                node=reg.node,
                epoch=reg.epoch,
                restored_series=reg.restored_series,
                restore_seconds=round(reg.restore_seconds, 6),
                restoring_since=self.restoring_since,
                ready_at=self.ready_at,
                claim_expires_in=None
                if claim is None
                else round(max(claim.deadline() - time.monotonic(), 0.0), 3),
            )
        )

    async def openapi(self, request: Request) -> Response:
        return Response(_OPENAPI_BYTES, 200, _JSON_HEADERS)

    async def metrics(self, request: Request) -> Response:
        reg = self._registry()
        # Memory only, but a big registry takes a while: keep the loop free.
        body, content_type = await asyncio.to_thread(render, reg, request.headers.get("accept"))
        return Response(body, 200, {"content-type": content_type})

    async def ui_state(self, request: Request) -> Response:
        """``GET /ui/state.json``: see ``keepcount.node.live``."""
        return await self.live.answer(request)

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
        if self._auth is not None:
            self._authorize(auth)
        if key is not None and not _KEY_BYTES.fullmatch(key):
            raise _invalid_key()
        body = await self._body(receive, length)
        labels: dict[str, str] = _EMPTY
        by, help_ = 1, None
        if body:
            if ctype != b"application/json" and (
                ctype is None or ctype.split(b";", 1)[0].strip().lower() != b"application/json"
            ):
                given = "no Content-Type" if ctype is None else ctype.decode("latin-1")
                raise HTTPError(
                    415,
                    ErrorCode.UNSUPPORTED_MEDIA_TYPE,
                    f"the body must be application/json, not {given}",
                )
            request = decode_increment(body)
            labels, by = request.labels, request.by
            if isinstance(request.help, str):
                help_ = request.help
        name: str = scope["path_params"]["name"]

        reg = self.serving()
        family = reg.get(name) if reg is not None else None
        if family is None:
            # First use: everything is checked before the family is declared,
            # so a refused request declares nothing.
            check_metric_name(name)
            labelnames = check_label_names(sorted(labels))
            for n in labelnames:
                label_value(n, labels[n])
            if reg is None:
                raise self.not_ready()
            family = reg.counter(name, help_ or DEFAULT_HELP, labelnames=labelnames)
        assert reg is not None  # a family was found in it
        if not isinstance(family, Counter) or family.kind != "counter":
            raise HTTPError(
                422,
                ErrorCode.DEFINITION_CONFLICT,
                f"{name} is a {family.kind}, not a counter: it cannot be incremented",
            )
        names = family.labelnames
        if len(labels) != len(names) or not all(n in labels for n in names):
            check_label_names(sorted(labels))  # an invalid name is invalid_input first
            raise HTTPError(
                422,
                ErrorCode.DEFINITION_CONFLICT,
                f"{name} has the labels {sorted(names)}; got {sorted(labels)}",
            )
        child = family.labels(*[labels[n] for n in names]) if names else family.labels()
        if child.value + by > MAX_VALUE:
            raise HTTPError(
                422,
                ErrorCode.INVALID_AMOUNT,
                f"{name}{labels}: the value would pass 2**63-1; increment refused",
            )
        if self.config.unsafe_ack_before_durable:
            child.inc(by)  # the mutant: acknowledged before it is durable
            receipt = Receipt(reg.node, name, dict(labels), child.value)
        elif key is None:
            receipt = await reg.increment(child, by)
        else:
            request_key = _canonical({"name": name, "labels": labels, "by": by})
            fingerprint = hashlib.sha256(request_key.encode()).hexdigest()
            receipt = await reg.increment(
                child, by, key=key.decode("ascii"), fingerprint=fingerprint
            )
        if self.state in _UNVOUCHED:
            # Durable, but this node can no longer vouch that it alone holds
            # the id: not acknowledged (a keyed retry is counted once).
            raise HTTPError(
                503,
                ErrorCode.CLAIM_LOST,
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
            IncrementResult(receipt.node, receipt.name, receipt.labels, receipt.value, True)
        )
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(payload)),
        ]
        if receipt.replayed:
            headers.append((b"idempotency-replayed", b"true"))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": payload})

    def _authorize(self, auth: bytes | None) -> None:
        """Refuse a write without the node's token (401), when it has one."""
        if self._auth is not None and (auth is None or not hmac.compare_digest(auth, self._auth)):
            raise HTTPError(
                401,
                ErrorCode.UNAUTHORIZED,
                "this node requires 'Authorization: Bearer <token>' for writes",
                {"www-authenticate": "Bearer"},
            )

    # -- settling a key ------------------------------------------------------------

    async def settle(self, request: Request) -> Response:
        """``GET /v1/idempotency/{key}``: ``Registry.settle_key`` (``keepcount.settle``)."""
        auth = request.headers.get("authorization")
        self._authorize(None if auth is None else auth.encode("latin-1"))
        key: str = request.path_params["key"]
        if not _KEY_TEXT.fullmatch(key):
            raise _invalid_key()
        reg = self._registry()
        if self.config.unsafe_settle_without_refusal:
            settlement = await _settle_by_lookup(reg, key)  # the mutant
        else:
            settlement = await reg.settle_key(key)
        if settlement.status is SettleStatus.NOT_APPLIED and self.state in _UNVOUCHED:
            # The refusal is durable, but this node can no longer vouch that
            # it alone held its id when it was written: ask again.
            raise HTTPError(
                503,
                ErrorCode.CLAIM_LOST,
                f"node {self.config.node} lost the certainty of its claim before answering; "
                "ask again",
            )
        r = settlement.receipt
        receipt = None if r is None else IncrementResult(r.node, r.name, r.labels, r.value, True)
        return _json(SettleResult(key, settlement.status.value, receipt))

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
                raise HTTPError(404, ErrorCode.NOT_FOUND, f"node {reg.node} has no metric {name}")
            if not is_native_kind(family.kind):
                raise HTTPError(
                    404,
                    ErrorCode.NOT_FOUND,
                    f"{name} is a {family.kind}: this API serves counters and histograms only",
                )
            families = [family]
        series = await asyncio.to_thread(_local, families)
        return _json(NodeCounters(reg.node, series))

    async def cluster(self, request: Request) -> Response:
        name = request.path_params.get("name")
        if name is not None:
            check_metric_name(name)
        reg = self._registry()
        totals = await asyncio.to_thread(reg.cluster, name)
        if name is not None and not totals:
            raise HTTPError(
                404, ErrorCode.NOT_FOUND, f"no node of the store has a series of {name}"
            )
        return _json(ClusterCounters(_cluster(totals)))


def _invalid_key() -> HTTPError:
    return HTTPError(
        400,
        ErrorCode.INVALID_IDEMPOTENCY_KEY,
        "an Idempotency-Key must be 1-255 printable ASCII characters (no spaces)",
    )


async def _settle_by_lookup(reg: Registry, key: str) -> Settlement:
    """The mutant of ``NodeConfig.unsafe_settle_without_refusal``: what the
    store holds now, with no refusal written (so a queued increment may land)."""
    record = await asyncio.to_thread(reg.store.lookup_key, key)
    if record is None or is_refusal(record):
        return Settlement(key, SettleStatus.NOT_APPLIED)
    return Settlement(key, SettleStatus.APPLIED, receipt_of(record))


def _too_large(limit: int) -> HTTPError:
    return HTTPError(413, ErrorCode.BODY_TOO_LARGE, f"the body is larger than {limit} bytes")


def _value(value: int | HistogramValue, buckets: Sequence[float]) -> int | HistogramBody:
    if isinstance(value, int):
        return value
    return HistogramBody(
        value.count,
        value.sum,
        {_bound(b): c for b, c in zip(buckets, value.cumulative(), strict=True)},
    )


def _local(families: Iterable[MetricFamily[Any]]) -> list[Series]:
    out: list[Series] = []
    for family in sorted(families, key=lambda f: f.name):
        name, kind, names = family.name, family.kind, family.labelnames
        buckets: Sequence[float] = getattr(family, "buckets", ())
        for values, value, _created in sorted(family.series(), key=lambda s: s[0]):
            labels = dict(zip(names, values, strict=True))
            out.append(Series(name, kind, labels, _value(value, buckets)))  # type: ignore[arg-type]
    return out


def _cluster(totals: Iterable[SeriesTotal]) -> list[ClusterSeries]:
    return [
        ClusterSeries(
            t.name,
            t.kind,  # type: ignore[arg-type]
            t.labels,
            _value(t.value, t.buckets),
            {node: _value(v, t.buckets) for node, v in sorted(t.nodes.items())},
        )
        for t in totals
    ]
