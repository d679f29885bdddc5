"""The OpenAPI document is valid OpenAPI 3.1 and describes exactly the app's routes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema_rs
import pytest
from starlette.routing import Route

from keepcount.node import HTTPError, NodeConfig, create_app, decode_increment
from keepcount.openapi import MAX_HELP_LENGTH, OPENAPI, operations

DOC: dict[str, Any] = json.loads(json.dumps(OPENAPI))  # as served


def test_the_document_is_valid_openapi_3_1() -> None:
    try:  # the reference validator, when installed
        from openapi_spec_validator import validate  # type: ignore[import-not-found]
    except ImportError:
        # schemathesis' copy of the official OAS 3.1 schema (schemas/v3.1/schema.yaml)
        from schemathesis.specs.openapi.definitions import OPENAPI_31

        jsonschema_rs.Draft202012Validator(OPENAPI_31).validate(DOC)
    else:
        validate(DOC)
    assert DOC["openapi"] == "3.1.0"


def schemas(node: Any, path: str = "#") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every Schema Object of the document, with where it is."""
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}/{key}"
            if key == "schema" or (path == "#/components/schemas"):
                yield where, value
            elif key != "examples":
                yield from schemas(value, where)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from schemas(value, f"{path}/{i}")


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def test_every_schema_is_valid_json_schema_2020_12_and_every_ref_resolves() -> None:
    found = list(schemas(DOC))
    assert len(found) > 20
    for where, schema in found:
        jsonschema_rs.meta.validate(schema)
        # compiling it with the document as its root resolves its $refs
        jsonschema_rs.Draft202012Validator({**schema, "components": DOC["components"]})
        assert where
    for ref in refs(DOC):
        node: Any = DOC
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        assert isinstance(node, dict), ref


def validator(name: str) -> jsonschema_rs.Validator:
    return jsonschema_rs.Draft202012Validator(
        {"$ref": f"#/components/schemas/{name}", "components": DOC["components"]}
    )


def test_the_schemas_say_what_the_api_means() -> None:
    request = validator("IncrementRequest")
    for ok in ({}, {"by": 0}, {"by": 2**63 - 1}, {"labels": {"route": "/", "_x": ""}},
               {"help": ""}, {"help": "Requests served"}, {"help": "é" * MAX_HELP_LENGTH},
               {"help": 'Zähler "x" \\ 🙂'}):  # fmt: skip
        assert request.is_valid(ok), ok
    for bad in ({"by": -1}, {"by": 2**63}, {"by": 1.5}, {"by": True}, {"by": "1"},
                {"labels": {"a": 1}}, {"labels": {"__a": "x"}}, {"labels": {"a-b": "x"}},
                {"labels": []}, {"extra": 1}, {"labels": {"a": "x" * 1025}},
                {"help": 5}, {"help": None}, {"help": ["a"]}, {"help": "x" * (MAX_HELP_LENGTH + 1)},
                {"help": "a\nb"}, {"help": "a\tb"}, {"help": "\x00"}, {"help": "\x7f"},
                {"help": "\x85"}):  # fmt: skip
        assert not request.is_valid(bad), bad
    error = validator("Error")
    assert error.is_valid({"error": {"code": "not_ready", "message": "restoring"}})
    assert not error.is_valid({"error": {"code": "x"}})
    series = validator("Series")
    assert series.is_valid({"name": "h", "kind": "histogram", "labels": {},
                            "value": {"count": 1, "sum": 0.5, "buckets": {"+Inf": 1}}})  # fmt: skip
    assert not series.is_valid({"name": "c", "kind": "counter", "labels": {}, "value": -1})


def app_operations() -> set[tuple[str, str]]:
    app = create_app(NodeConfig(node="n1", store="sqlite:///unused.db"))
    found = set()
    for route in app.routes:
        assert isinstance(route, Route)
        for method in route.methods or ():
            if method != "HEAD":  # Starlette answers HEAD wherever GET is served
                found.add((method, route.path.replace(":anykey}", "}")))  # {key:anykey}
    return found


def test_the_documented_help_is_the_help_the_node_accepts() -> None:
    schema = DOC["components"]["schemas"]["IncrementRequest"]["properties"]["help"]
    assert schema["maxLength"] == MAX_HELP_LENGTH
    for text in ("", "ok", "é" * MAX_HELP_LENGTH, "x" * (MAX_HELP_LENGTH + 1),
                 *(chr(c) for c in range(0xA1))):  # fmt: skip
        try:
            decode_increment(json.dumps({"help": text}).encode())  # the node's own check
        except HTTPError:
            accepted = False
        else:
            accepted = True
        assert validator("IncrementRequest").is_valid({"help": text}) is accepted, repr(text)


def test_every_route_is_documented_and_every_operation_served() -> None:
    assert app_operations() == operations()


@pytest.mark.parametrize("status", ["400", "401", "413", "415", "422", "503"])
def test_the_increment_documents_every_error_with_the_error_schema(status: str) -> None:
    responses = DOC["paths"]["/v1/counters/{name}/increment"]["post"]["responses"]
    ref = responses[status]["$ref"].removeprefix("#/components/responses/")
    content = DOC["components"]["responses"][ref]["content"]
    assert content == {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}


def test_the_document_is_derived_from_the_code() -> None:
    from keepcount.errors import ErrorCode, InvalidInput
    from keepcount.naming import MAX_LABEL_VALUE_LENGTH, MAX_NAME_LENGTH, check_metric_name

    assert set(DOC["components"]["schemas"]["ErrorCode"]["enum"]) == {c.value for c in ErrorCode}
    name = DOC["paths"]["/v1/counters/{name}"]["get"]["parameters"][0]["schema"]
    assert name["maxLength"] == MAX_NAME_LENGTH
    documented = jsonschema_rs.Draft202012Validator(name)
    for text in ("a", "a:b_c", "_x", "1a", "a-b", "a.b", "a_bucket", "x_count", "y_sum",
                 "z_created", "é", "n" * MAX_NAME_LENGTH, "n" * (MAX_NAME_LENGTH + 1)):  # fmt: skip
        try:
            check_metric_name(text)
        except InvalidInput:
            accepted = False
        else:
            accepted = True
        assert documented.is_valid(text) is accepted, text
    labels = DOC["components"]["schemas"]["IncrementRequest"]["properties"]["labels"]
    assert labels["additionalProperties"]["maxLength"] == MAX_LABEL_VALUE_LENGTH
