"""The node's HTTP API as an OpenAPI 3.1 document, written out by hand.

The document is the contract (DESIGN §3 "HTTP (one node)"); the node serves
it at ``GET /openapi.json``.  It is checked, not generated: a test validates
it against the OpenAPI 3.1 meta-schema, another holds the app's routes and
the document's paths to each other, and the fuzz test (schemathesis) sends
what it describes and holds every answer to it.

Every error, on every path, has the same body: ``{"error": {"code",
"message"}}``; ``code`` is stable (see ``keepcount.errors`` and
``keepcount.node``), ``message`` is for people.
"""

from __future__ import annotations

from typing import Any

from keepcount import __version__
from keepcount.metrics import MAX_VALUE
from keepcount.naming import MAX_LABEL_VALUE_LENGTH, MAX_NAME_LENGTH
from keepcount.ui.assets import ASSETS, PAGE_PATH, STATE_PATH
from keepcount.ui.state import STATE_SCHEMA

__all__ = ["DEFAULT_HELP", "MAX_HELP_LENGTH", "OPENAPI", "operations"]

# Part of the contract, so defined here (keepcount.node, which serves this
# document, imports them from it).
DEFAULT_HELP = "Counted through the keepcount HTTP API (POST /v1/counters/{name}/increment)."
"""The HELP text of a counter first declared by an increment without ``help``
(every exposed family needs one: ``promtool check metrics``)."""

MAX_HELP_LENGTH = 1024
"""Characters of an increment's ``help``; like a label value, it is stored and
written into every scrape."""

_JSON = "application/json"


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {_JSON: {"schema": schema}}}


def _ok(description: str, schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"description": description, **_json_body(schema), **extra}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): _ref("responses", f"E{s}") for s in statuses}


_ERROR_RESPONSES: dict[str, dict[str, Any]] = {
    "E400": {
        "description": "Malformed request: the body is not a JSON object "
        "(`malformed_json`) or the Idempotency-Key header is not 1-255 printable "
        "ASCII characters (`invalid_idempotency_key`). Nothing changed.",
        **_json_body(_ref("schemas", "Error")),
    },
    "E401": {
        "description": "The node requires a bearer token for writes and the request "
        "carried none or a wrong one (`unauthorized`). Nothing changed.",
        "headers": {"WWW-Authenticate": {"schema": {"type": "string", "const": "Bearer"}}},
        **_json_body(_ref("schemas", "Error")),
    },
    "E404": {
        "description": "No counter or histogram of that name (`not_found`).",
        **_json_body(_ref("schemas", "Error")),
    },
    "E413": {
        "description": "The body is larger than the node's limit (`body_too_large`, "
        "64 KiB unless configured). Nothing changed.",
        **_json_body(_ref("schemas", "Error")),
    },
    "E415": {
        "description": "A body was sent with a Content-Type other than "
        "application/json (`unsupported_media_type`). Nothing changed.",
        **_json_body(_ref("schemas", "Error")),
    },
    "E422": {
        "description": "Well-formed but refused, nothing changed: unknown field, "
        "labels not an object of strings, or `help` not a string of at most "
        f"{MAX_HELP_LENGTH} characters without control characters (`invalid_input`); "
        "`by` not an integer in [0, 2^63-1] or the value would pass 2^63-1 "
        "(`invalid_amount`); invalid metric name, label name or label value "
        "(`invalid_input`); labels that differ from the "
        "existing family's, or a histogram of that name (`definition_conflict`); the "
        "family already holds its maximum of label sets (`too_many_label_sets`, the "
        "message names the limit); an Idempotency-Key reused with another request "
        "(`idempotency_key_reused`).",
        **_json_body(_ref("schemas", "Error")),
    },
    "E500": {
        "description": "A bug in the node (`internal_error`); nothing was acknowledged.",
        **_json_body(_ref("schemas", "Error")),
    },
    "E503": {
        "description": "Nothing acknowledged: the node is not ready (`not_ready`: "
        "claiming or restoring, shutting down, or its claim was lost), or the store "
        "failed (`store_unavailable`, `outcome_unknown`, `fenced`, ...), or the node could "
        "no longer vouch for its claim when the increment became durable (`claim_lost`: "
        "maybe counted, not acknowledged). Retry later "
        "(with the same Idempotency-Key), on this node or another.",
        "headers": {"Retry-After": {"schema": {"type": "string", "pattern": "^[0-9]+$"}}},
        **_json_body(_ref("schemas", "Error")),
    },
}

_LABELS = {
    "type": "object",
    "description": "Label names to label values.",
    "propertyNames": {
        "type": "string",
        "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$",
        "not": {"pattern": "^__"},
    },
    "additionalProperties": {"type": "string", "maxLength": MAX_LABEL_VALUE_LENGTH},
}

_HISTOGRAM_VALUE = {
    "type": "object",
    "required": ["count", "sum", "buckets"],
    "additionalProperties": False,
    "properties": {
        "count": {"type": "integer", "minimum": 0},
        "sum": {"type": "number"},
        "buckets": {
            "type": "object",
            "description": "Upper bound (as Prometheus writes it: `0.005`, `1.0`, `+Inf`) "
            "to the cumulative count of observations at or below it.",
            "additionalProperties": {"type": "integer", "minimum": 0},
        },
    },
}

_VALUE = {
    "description": "A counter's value, or a histogram's count, sum and cumulative buckets.",
    "oneOf": [
        {"type": "integer", "minimum": 0, "maximum": MAX_VALUE},
        _ref("schemas", "HistogramValue"),
    ],
}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "additionalProperties": False,
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "additionalProperties": False,
                "properties": {
                    "code": {"type": "string", "pattern": "^[a-z_]+$"},
                    "message": {"type": "string"},
                },
            }
        },
    },
    "Labels": _LABELS,
    "IncrementRequest": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "labels": {**_ref("schemas", "Labels"), "default": {}},
            "by": {"type": "integer", "minimum": 0, "maximum": MAX_VALUE, "default": 1},
            "help": {
                "type": "string",
                "maxLength": MAX_HELP_LENGTH,
                "pattern": r"^[^\x00-\x1f\x7f-\x9f]*$",
                "description": "The counter's HELP text on /metrics: up to "
                f"{MAX_HELP_LENGTH} characters, no control characters. Without it (or "
                f'empty), a counter declared by this increment gets "{DEFAULT_HELP}"; '
                "given, it replaces the counter's help once the increment is acknowledged.",
            },
        },
    },
    "IncrementResult": {
        "type": "object",
        "required": ["node", "name", "labels", "value", "durable"],
        "additionalProperties": False,
        "properties": {
            "node": {"type": "string", "description": "The node that counted it."},
            "name": {"type": "string"},
            "labels": _ref("schemas", "Labels"),
            "value": {
                "type": "integer",
                "minimum": 0,
                "maximum": MAX_VALUE,
                "description": "That node's value of the series right after the increment.",
            },
            "durable": {"const": True},
        },
    },
    "HistogramValue": _HISTOGRAM_VALUE,
    "Series": {
        "type": "object",
        "required": ["name", "kind", "labels", "value"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string"},
            "kind": {"enum": ["counter", "histogram"]},
            "labels": _ref("schemas", "Labels"),
            "value": _VALUE,
        },
    },
    "NodeCounters": {
        "type": "object",
        "required": ["node", "counters"],
        "additionalProperties": False,
        "properties": {
            "node": {"type": "string"},
            "counters": {"type": "array", "items": _ref("schemas", "Series")},
        },
    },
    "ClusterSeries": {
        "type": "object",
        "required": ["name", "kind", "labels", "value", "nodes"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string"},
            "kind": {"enum": ["counter", "histogram"]},
            "labels": _ref("schemas", "Labels"),
            "value": {**_VALUE, "description": "The sum over every node."},
            "nodes": {
                "type": "object",
                "description": "Each node's part of the sum (released and dead nodes too).",
                "additionalProperties": _VALUE,
            },
        },
    },
    "ClusterCounters": {
        "type": "object",
        "required": ["counters"],
        "additionalProperties": False,
        "properties": {
            "counters": {"type": "array", "items": _ref("schemas", "ClusterSeries")},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "additionalProperties": False,
        "properties": {"status": {"const": "ok"}},
    },
    "UIState": STATE_SCHEMA,
    "Ready": {
        "type": "object",
        "required": ["status", "node", "epoch", "restored_series", "restore_seconds"],
        "additionalProperties": False,
        "properties": {
            "status": {"const": "ready"},
            "node": {"type": "string"},
            "epoch": {"type": "integer", "minimum": 1},
            "restored_series": {"type": "integer", "minimum": 0},
            "restore_seconds": {"type": "number", "minimum": 0},
            "restoring_since": {
                "type": "number",
                "description": "Wall-clock time (Unix seconds) the node began claiming "
                "its id and restoring.",
            },
            "ready_at": {
                "type": "number",
                "description": "Wall-clock time (Unix seconds) it was restored and began serving.",
            },
            "claim_expires_in": {
                "type": ["number", "null"],
                "minimum": 0,
                "description": "Seconds the coordinator claim is surely still held "
                "(null: no coordinator).",
            },
        },
    },
}

_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "Metric name (Prometheus rules; the suffixes _bucket, _count, _sum "
    "and _created are reserved).",
    "schema": {
        "type": "string",
        "pattern": "^[a-zA-Z_:][a-zA-Z0-9_:]*$",
        "maxLength": MAX_NAME_LENGTH,
        "not": {"pattern": "(_bucket|_count|_sum|_created)$"},
    },
}

_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "1-255 printable ASCII characters. A retry with the same key and "
    "body is answered with the first answer and counted once, whichever node of the "
    "store it reaches, for the node's idempotency window (a day by default).",
    "schema": {"type": "string", "pattern": "^[!-~]{1,255}$"},
}

_NOT_READY = _errors(503)

_PATHS: dict[str, Any] = {
    "/v1/counters/{name}/increment": {
        "post": {
            "operationId": "increment",
            "summary": "Add to a counter; answered only once the increment is durable.",
            "description": "Declares the counter on first use with the given label names "
            "and `help`. `labels` defaults to `{}` and `by` to 1; an empty body means both "
            "defaults.",
            "parameters": [_NAME, _IDEMPOTENCY_KEY],
            "security": [{}, {"bearer": []}],
            "requestBody": {
                "required": False,
                **_json_body(_ref("schemas", "IncrementRequest")),
            },
            "responses": {
                "200": _ok(
                    "Counted and durable (or, with a known Idempotency-Key, the first answer).",
                    _ref("schemas", "IncrementResult"),
                    headers={
                        "Idempotency-Replayed": {
                            "description": "`true` when the answer is an earlier request's "
                            "(same Idempotency-Key): nothing was counted now.",
                            "schema": {"type": "string", "const": "true"},
                        }
                    },
                ),
                **_errors(400, 401, 413, 415, 422, 500, 503),
            },
        }
    },
    "/v1/counters": {
        "get": {
            "operationId": "listCounters",
            "summary": "This node's counters and histograms, every series.",
            "responses": {
                "200": _ok("This node's values.", _ref("schemas", "NodeCounters")),
                **_errors(500, 503),
            },
        }
    },
    "/v1/counters/{name}": {
        "get": {
            "operationId": "getCounter",
            "summary": "This node's series of one counter or histogram.",
            "parameters": [_NAME],
            "responses": {
                "200": _ok("This node's values.", _ref("schemas", "NodeCounters")),
                **_errors(404, 422, 500, 503),
            },
        }
    },
    "/v1/cluster/counters": {
        "get": {
            "operationId": "listClusterCounters",
            "summary": "Every series summed over all nodes of the store, with each node's part.",
            "responses": {
                "200": _ok("Cluster totals.", _ref("schemas", "ClusterCounters")),
                **_errors(500, 503),
            },
        }
    },
    "/v1/cluster/counters/{name}": {
        "get": {
            "operationId": "getClusterCounter",
            "summary": "One name's series summed over all nodes, with each node's part.",
            "description": "404 when no node of the store has a series of that name.",
            "parameters": [_NAME],
            "responses": {
                "200": _ok("Cluster totals.", _ref("schemas", "ClusterCounters")),
                **_errors(404, 422, 500, 503),
            },
        }
    },
    "/metrics": {
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus text 0.0.4, or OpenMetrics 1.0 when the Accept header asks.",
            "responses": {
                "200": {
                    "description": "Every series of this node, plus keepcount_* node gauges.",
                    "content": {
                        "text/plain": {"schema": {"type": "string"}},
                        "application/openmetrics-text": {"schema": {"type": "string"}},
                    },
                },
                **_errors(500, 503),
            },
        }
    },
    "/healthz": {
        "get": {
            "operationId": "healthz",
            "summary": "Liveness: 200 as soon as the process serves HTTP.",
            "responses": {"200": _ok("The process is alive.", _ref("schemas", "Health"))},
        }
    },
    "/readyz": {
        "get": {
            "operationId": "readyz",
            "summary": "Readiness: 200 only once restored and while the claim is held.",
            "responses": {
                "200": _ok("Restored; the claim is held.", _ref("schemas", "Ready")),
                **_NOT_READY,
            },
        }
    },
    "/openapi.json": {
        "get": {
            "operationId": "openapi",
            "summary": "This document.",
            "responses": {"200": _ok("OpenAPI 3.1 document.", {"type": "object"})},
        }
    },
    STATE_PATH: {
        "get": {
            "operationId": "uiState",
            "summary": "What the live page shows: this node, the store's other node ids, "
            "the cluster totals of every counter.",
            "description": "Served whether or not the node is ready (a restoring node "
            "answers with its own state and `counters_error`). The store is read at most "
            "twice a second, whatever the number of pages open.",
            "responses": {"200": _ok("The page's state.", _ref("schemas", "UIState"))},
        }
    },
}


def _asset_operation_id(path: str) -> str:
    words = path.removeprefix(PAGE_PATH).replace(".", "/").split("/")
    return "ui" + "".join(w[:1].upper() + w[1:] for w in words if w)


for _path, (_file, _type) in ASSETS.items():
    _PATHS[_path] = {
        "get": {
            "operationId": "uiPage" if _path == PAGE_PATH else _asset_operation_id(_path),
            "summary": "The live page for operators (HTML)."
            if _path == PAGE_PATH
            else f"A file of the live page ({_file}).",
            "responses": {
                "200": {
                    "description": "The file, with a same-origin Content-Security-Policy.",
                    "content": {_type.split(";")[0]: {"schema": {"type": "string"}}},
                }
            },
        }
    }

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "keepcount node",
        "version": __version__,
        "summary": "Counters that survive crashes, restarts and node failures.",
        "description": "One node of a keepcount cluster. An increment is answered 200 only "
        "once it is durable in the store; every other answer means it was not "
        'acknowledged. Errors are `{"error": {"code", "message"}}` everywhere.',
        "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
    },
    "paths": _PATHS,
    "components": {
        "schemas": _SCHEMAS,
        "responses": _ERROR_RESPONSES,
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "Only when the node was started with a token (--token or "
                "KEEPCOUNT_TOKEN): then every POST needs `Authorization: Bearer <token>`. "
                "GETs stay open.",
            }
        },
    },
}


def operations() -> set[tuple[str, str]]:
    """(METHOD, path) of every operation the document describes."""
    return {(m.upper(), p) for p, item in _PATHS.items() for m in item}
