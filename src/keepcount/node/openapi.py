"""The node's HTTP API as an OpenAPI 3.1 document, derived, not written.

Paths and methods come from the route table (``keepcount.node.routes``) and
the live page's files (``keepcount.ui.ASSETS``); request and answer schemas
from the msgspec types that decode and encode the bodies
(``keepcount.node.bodies``, via ``msgspec.json.schema_components``); the
metric name and label patterns and limits from ``keepcount.naming``; the
error codes of each status from ``keepcount.node.errors.ANSWERS``.  The node
serves it at ``GET /openapi.json``; a test validates it against the OpenAPI
3.1 meta-schema and the fuzz test (schemathesis) holds every answer to it.

Every error, on every path, has the same body: ``{"error": {"code",
"message"}}``; ``code`` is stable (``keepcount.errors.ErrorCode``),
``message`` is for people.
"""

from __future__ import annotations

from typing import Any

import msgspec

from keepcount import __version__
from keepcount.node.bodies import Error, MetricName, ecma_pattern
from keepcount.node.config import KEY_PATTERN, TOKEN_ENV
from keepcount.node.errors import ANSWERS, RETRY_AFTER
from keepcount.node.routes import OPERATIONS, Operation
from keepcount.ui.assets import ASSETS, PAGE_PATH
from keepcount.ui.state import STATE_SCHEMA

__all__ = ["OPENAPI", "build", "operations"]

_JSON = "application/json"
_REF = "#/components/schemas/{name}"

_ERROR_INTROS = {
    400: "Malformed request; nothing changed",
    401: "Unauthorized; nothing changed",
    404: "Not found",
    409: "Conflict; nothing counted",
    413: "Too large; nothing changed",
    415: "Unsupported Content-Type; nothing changed",
    422: "Well-formed but refused; nothing changed",
    500: "Internal error",
    503: "Nothing acknowledged; retry later (with the same Idempotency-Key), on this "
    "node or another",
}
_ERROR_HEADERS = {
    401: {"WWW-Authenticate": {"schema": {"type": "string", "const": "Bearer"}}},
    503: {"Retry-After": {"schema": {"type": "string", "pattern": "^[0-9]+$"}}},
}


def _ecma(node: Any) -> Any:
    """``node`` with every ``pattern`` written for ECMA-262 (``bodies.ecma_pattern``)."""
    if isinstance(node, dict):
        return {
            k: ecma_pattern(v) if k == "pattern" and isinstance(v, str) else _ecma(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_ecma(v) for v in node]
    return node


def _content(schema: dict[str, Any], media: str = _JSON) -> dict[str, Any]:
    return {"content": {media: {"schema": schema}}}


def _error_response(status: int) -> dict[str, Any]:
    codes = "; ".join(f"`{c}`: {meaning}" for c, (s, meaning) in ANSWERS.items() if s == status)
    response: dict[str, Any] = {
        "description": f"{_ERROR_INTROS[status]}. {codes}.",
        **_content({"$ref": _REF.format(name="Error")}),
    }
    if status in _ERROR_HEADERS:
        response["headers"] = _ERROR_HEADERS[status]
    return response


def _operation(op: Operation, refs: dict[type, dict[str, Any]]) -> dict[str, Any]:
    if isinstance(op.answer, dict):
        content = {media: {"schema": schema} for media, schema in op.answer.items()}
    else:
        content = {_JSON: {"schema": refs[op.answer]}}
    ok: dict[str, Any] = {"description": op.ok, "content": content}
    if op.answer_headers:
        ok["headers"] = dict(op.answer_headers)
    doc: dict[str, Any] = {"operationId": op.operation_id, "summary": op.summary}
    if op.description is not None:
        doc["description"] = op.description
    parameters = []
    if op.path_name:
        name = _ecma(msgspec.json.schema(MetricName))
        description = name.pop("description")
        parameters.append(
            {"name": "name", "in": "path", "required": True, "description": description,
             "schema": name}
        )  # fmt: skip
    if op.path_key:
        parameters.append(
            {
                "name": "key",
                "in": "path",
                "required": True,
                "description": "The Idempotency-Key to settle, percent-encoded (it may "
                "hold `/`, `?`, `#`, `%`); 1-255 printable ASCII characters once decoded.",
                "schema": {"type": "string", "pattern": f"^{KEY_PATTERN}$"},
            }
        )
    if op.idempotency_key:
        parameters.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "1-255 printable ASCII characters. A retry with the same "
                "key and body is answered with the first answer and counted once, "
                "whichever node of the store it reaches, for the node's idempotency "
                "window (a day by default).",
                "schema": {"type": "string", "pattern": f"^{KEY_PATTERN}$"},
            }
        )
    if parameters:
        doc["parameters"] = parameters
    if op.bearer:
        doc["security"] = [{}, {"bearer": []}]
    if op.request is not None:
        doc["requestBody"] = {"required": False, **_content(refs[op.request])}
    doc["responses"] = {
        "200": ok,
        **{str(s): {"$ref": f"#/components/responses/E{s}"} for s in op.errors},
    }
    return doc


def _asset(path: str, file: str, content_type: str) -> dict[str, Any]:
    if path == PAGE_PATH:
        operation_id, summary = "uiPage", "The live page for operators (HTML)."
    else:
        words = path.removeprefix(PAGE_PATH).replace(".", "/").split("/")
        operation_id = "ui" + "".join(w[:1].upper() + w[1:] for w in words if w)
        summary = f"A file of the live page ({file})."
    return {
        "operationId": operation_id,
        "summary": summary,
        "responses": {
            "200": {
                "description": "The file, with a same-origin Content-Security-Policy.",
                **_content({"type": "string"}, content_type.split(";", maxsplit=1)[0]),
            }
        },
    }


def build() -> dict[str, Any]:
    """The document, from the route table and the body types."""
    types = sorted(
        {op.answer for op in OPERATIONS if isinstance(op.answer, type)}
        | {op.request for op in OPERATIONS if op.request is not None}
        | {Error},
        key=lambda t: t.__name__,
    )
    found, components = msgspec.json.schema_components(types, ref_template=_REF)
    refs = dict(zip(types, found, strict=True))
    paths: dict[str, Any] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op, refs)
    for path, (file, content_type) in ASSETS.items():
        paths[path] = {"get": _asset(path, file, content_type)}
    statuses = sorted({s for op in OPERATIONS for s in op.errors})
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "keepcount node",
            "version": __version__,
            "summary": "Counters that survive crashes, restarts and node failures.",
            "description": "One node of a keepcount cluster. An increment is answered 200 "
            "only once it is durable in the store; every other answer means it was not "
            'acknowledged. Errors are `{"error": {"code", "message"}}` everywhere. '
            f"A 503 carries Retry-After ({RETRY_AFTER} s).",
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "paths": paths,
        "components": {
            "schemas": {**_ecma(components), "UIState": STATE_SCHEMA},
            "responses": {f"E{s}": _error_response(s) for s in statuses},
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Only when the node was started with a token (--token "
                    f"or {TOKEN_ENV}): then every POST, and settling a key (it writes), "
                    "needs `Authorization: Bearer <token>`. Other GETs stay open.",
                }
            },
        },
    }


OPENAPI: dict[str, Any] = build()
"""The document the node serves."""


def operations() -> set[tuple[str, str]]:
    """(METHOD, path) of every operation the document describes."""
    return {(m.upper(), p) for p, item in OPENAPI["paths"].items() for m in item}
