"""The node's route table: every operation of its HTTP API, once.

``create_app`` mounts each ``Operation`` on the ``Node`` method it names;
the OpenAPI document (``keepcount.node.openapi``) is written from the same
table: path, method, parameters, request and answer types (the msgspec
types of ``keepcount.node.bodies``), and the statuses of its errors.  The
live page's files (``keepcount.ui.ASSETS``) are added to both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.convertors import Convertor, register_url_convertor

from keepcount.node.bodies import (
    ClusterCounters,
    Health,
    IncrementRequest,
    IncrementResult,
    NodeCounters,
    Ready,
    SettleResult,
)
from keepcount.ui.assets import STATE_PATH

__all__ = ["INCREMENT_PATH", "OPERATIONS", "SETTLE_PATH", "Operation"]

INCREMENT_PATH = "/v1/counters/{name}/increment"
SETTLE_PATH = "/v1/idempotency/{key}"


@dataclass(frozen=True, slots=True)
class Operation:
    """One operation: ``method`` on ``path``, served by ``Node.<endpoint>``.

    ``answer``: the msgspec type of the 200 body, or ``{media type: JSON
    Schema}`` for a body of another kind.  ``errors``: the statuses of its
    error answers.  ``asgi``: the endpoint is a plain ASGI callable (the hot
    path), not a request handler.
    """

    path: str
    method: str
    endpoint: str
    operation_id: str
    summary: str
    ok: str
    answer: Any
    errors: tuple[int, ...] = ()
    description: str | None = None
    path_name: bool = False
    """``{name}`` in the path is a metric name."""
    path_key: bool = False
    """``{key}`` in the path is an idempotency key (routed as ``{key:anykey}``:
    any text, ``/`` and newlines included, so that every malformed key gets
    its 400, not a 404)."""
    idempotency_key: bool = False
    request: type | None = None
    bearer: bool = False
    """A token, when the node has one, is required."""
    answer_headers: Mapping[str, Any] = field(default_factory=dict)

    @property
    def route(self) -> str:
        """The path as Starlette routes it."""
        return self.path.replace("{key}", "{key:anykey}") if self.path_key else self.path


class _AnyText(Convertor[str]):
    """A path parameter of any text (Starlette's ``path`` stops at a newline)."""

    regex = "(?s:.*)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("anykey", _AnyText())


_READ_ERRORS = (500, 503)
_NAMED_READ_ERRORS = (404, 422, 500, 503)

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        INCREMENT_PATH, "POST", "increment", "increment",
        summary="Add to a counter; answered only once the increment is durable.",
        description="Declares the counter on first use with the given label names and "
        "`help`. `labels` defaults to `{}` and `by` to 1; an empty body means both defaults.",
        ok="Counted and durable (or, with a known Idempotency-Key, the first answer).",
        answer=IncrementResult,
        answer_headers={
            "Idempotency-Replayed": {
                "description": "`true` when the answer is an earlier request's "
                "(same Idempotency-Key): nothing was counted now.",
                "schema": {"type": "string", "const": "true"},
            }
        },
        errors=(400, 401, 409, 413, 415, 422, 500, 503),
        path_name=True, idempotency_key=True, request=IncrementRequest, bearer=True,
    ),
    Operation(
        SETTLE_PATH, "GET", "settle", "settleIdempotencyKey",
        summary="Settle an Idempotency-Key for good: applied, not applied (final), or in flight.",
        description="For a client that will not retry an increment whose outcome it does "
        "not know. `applied`: it was counted, once; the answer carries its first receipt. "
        "`not_applied`: it was not counted, and now never will be: this node durably "
        "records a refusal of the key (under its claim, like any write) before answering, "
        "so an increment with that key still queued on any node of the store is dropped "
        "when it flushes, and every later increment with it is refused (409 "
        "`idempotency_key_settled`), until the key expires (the idempotency window). "
        "`in_flight`: an increment with the key is queued on this node or being recorded "
        "by another; ask again later. Not a safe GET: it may write the refusal (so it "
        "takes the bearer token when the node has one); it is idempotent.",
        ok="The key's fate.", answer=SettleResult,
        errors=(400, 401, 500, 503), path_key=True, bearer=True,
    ),
    Operation(
        "/v1/counters", "GET", "counters", "listCounters",
        summary="This node's counters and histograms, every series.",
        ok="This node's values.", answer=NodeCounters, errors=_READ_ERRORS,
    ),
    Operation(
        "/v1/counters/{name}", "GET", "counters", "getCounter",
        summary="This node's series of one counter or histogram.",
        ok="This node's values.", answer=NodeCounters, errors=_NAMED_READ_ERRORS,
        path_name=True,
    ),
    Operation(
        "/v1/cluster/counters", "GET", "cluster", "listClusterCounters",
        summary="Every series summed over all nodes of the store, with each node's part.",
        ok="Cluster totals.", answer=ClusterCounters, errors=_READ_ERRORS,
    ),
    Operation(
        "/v1/cluster/counters/{name}", "GET", "cluster", "getClusterCounter",
        summary="One name's series summed over all nodes, with each node's part.",
        description="404 when no node of the store has a series of that name.",
        ok="Cluster totals.", answer=ClusterCounters, errors=_NAMED_READ_ERRORS,
        path_name=True,
    ),
    Operation(
        "/metrics", "GET", "metrics", "metrics",
        summary="Prometheus text 0.0.4, or OpenMetrics 1.0 when the Accept header asks.",
        ok="Every series of this node, plus keepcount_* node gauges.",
        answer={"text/plain": {"type": "string"},
                "application/openmetrics-text": {"type": "string"}},
        errors=_READ_ERRORS,
    ),
    Operation(
        "/healthz", "GET", "healthz", "healthz",
        summary="Liveness: 200 as soon as the process serves HTTP.",
        ok="The process is alive.", answer=Health,
    ),
    Operation(
        "/readyz", "GET", "readyz", "readyz",
        summary="Readiness: 200 only once restored and while the claim is held.",
        ok="Restored; the claim is held.", answer=Ready, errors=(503,),
    ),
    Operation(
        "/openapi.json", "GET", "openapi", "openapi",
        summary="This document.", ok="OpenAPI 3.1 document.",
        answer={"application/json": {"type": "object"}},
    ),
    Operation(
        STATE_PATH, "GET", "ui_state", "uiState",
        summary="What the live page shows: this node, the store's other node ids, "
        "the cluster totals of every counter.",
        description="Served whether or not the node is ready (a restoring node answers "
        "with its own state and `counters_error`). The store is read at most twice a "
        "second, whatever the number of pages open.",
        ok="The page's state.", answer={"application/json": {"$ref": "#/components/schemas/UIState"}},
    ),
)  # fmt: skip
"""The node's API, in the order of its routes."""
