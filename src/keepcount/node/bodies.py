"""The node's request and answer bodies as msgspec types.

The same types decode and validate a request (``decode_increment``), encode
the answers, and are the schemas of the OpenAPI document
(``keepcount.node.openapi``): the validation and the document cannot drift.
Names and labels follow ``keepcount.naming``: its patterns and limits are
put in the schemas from there, and its checks (with their messages) stay
the authority for them; the types hold what JSON itself must be (an object
of strings, an integer in range, a short printable ``help``).

A pattern is written for Python (``\\Z``: the end of the text; Python's
``$`` also matches before a final newline); the document writes it as
ECMA-262 does (``$``), see ``ecma_pattern``.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from keepcount import naming
from keepcount.errors import ErrorCode
from keepcount.metrics import MAX_VALUE
from keepcount.node.errors import HTTPError

__all__ = [
    "DEFAULT_HELP",
    "HELP_CHARS",
    "MAX_HELP_LENGTH",
    "ClusterCounters",
    "ClusterSeries",
    "Error",
    "ErrorBody",
    "Health",
    "HistogramValue",
    "IncrementRequest",
    "IncrementResult",
    "MetricName",
    "NodeCounters",
    "Ready",
    "Series",
    "SettleResult",
    "decode_increment",
    "ecma_pattern",
]

DEFAULT_HELP = "Counted through the keepcount HTTP API (POST /v1/counters/{name}/increment)."
"""The HELP text of a counter first declared by an increment without ``help``
(every exposed family needs one: ``promtool check metrics``)."""

MAX_HELP_LENGTH = 1024
"""Characters of an increment's ``help``; like a label value, it is stored and
written into every scrape."""

HELP_CHARS = r"[^\x00-\x1f\x7f-\x9f]*"
"""An increment's ``help``: no control characters (C0, DEL, C1)."""


def _whole(pattern: str) -> str:
    """``pattern`` matching a whole text (msgspec searches)."""
    return rf"^(?:{pattern})\Z"


def ecma_pattern(pattern: str) -> str:
    """A pattern of these types as JSON Schema (ECMA-262) writes it."""
    return pattern.replace(r"\Z", "$")


# naming.py's rules, as schemas.  Its checks run on every name and label (first use).
_RESERVED = "|".join(naming.RESERVED_SUFFIXES)
MetricName = Annotated[
    str,
    Meta(
        pattern=_whole(naming.METRIC_NAME_PATTERN),
        max_length=naming.MAX_NAME_LENGTH,
        extra_json_schema={"not": {"pattern": f"({_RESERVED})$"}},
        description="Metric name (Prometheus rules; the suffixes "
        f"{', '.join(naming.RESERVED_SUFFIXES)} are reserved).",
    ),
]
_LabelName = Annotated[
    str,
    Meta(
        extra_json_schema={
            "type": "string",
            "pattern": ecma_pattern(_whole(naming.LABEL_NAME_PATTERN)),
            "not": {"pattern": "^__"},  # reserved (naming.check_label_names)
        }
    ),
]
_LabelValue = Annotated[str, Meta(extra_json_schema={"maxLength": naming.MAX_LABEL_VALUE_LENGTH})]
Labels = Annotated[dict[_LabelName, _LabelValue], Meta(description="Label names to label values.")]
Amount = Annotated[int, Meta(ge=0, le=MAX_VALUE)]
_Count = Annotated[int, Meta(ge=0)]
Help = Annotated[
    str,
    Meta(
        max_length=MAX_HELP_LENGTH,
        pattern=_whole(HELP_CHARS),
        description=f"The counter's HELP text on /metrics: up to {MAX_HELP_LENGTH} "
        "characters, no control characters. Without it (or empty), a counter declared by "
        f'this increment gets "{DEFAULT_HELP}"; given, it replaces the counter\'s help once '
        "the increment is acknowledged.",
    ),
]


class IncrementRequest(Struct, forbid_unknown_fields=True):
    """``POST /v1/counters/{name}/increment``: an empty body means every default."""

    labels: Labels = {}
    by: Amount = 1
    help: Help | UnsetType = UNSET


class IncrementResult(Struct):
    node: Annotated[str, Meta(description="The node that counted it.")]
    name: str
    labels: Labels
    value: Annotated[
        Amount, Meta(description="That node's value of the series right after the increment.")
    ]
    durable: Literal[True]


class SettleResult(Struct, forbid_unknown_fields=True):
    """``GET /v1/idempotency/{key}``: the key's fate (``keepcount.settle``)."""

    key: str
    status: Annotated[
        Literal["applied", "not_applied", "in_flight"],
        Meta(description="`applied`: counted once (see `receipt`). `not_applied`: never "
             "counted, and now never will be: a refusal of the key is durable, so a late "
             "increment with it is refused (409 `idempotency_key_settled`) until the key "
             "expires. `in_flight`: an increment with the key is being recorded; ask again "
             "later. `applied` and `not_applied` are final."),
    ]  # fmt: skip
    receipt: Annotated[
        IncrementResult | None,
        Meta(description="With `applied`: the first answer to the key's increment."),
    ] = None


class HistogramValue(Struct, forbid_unknown_fields=True):
    count: _Count
    sum: float
    buckets: Annotated[
        dict[str, _Count],
        Meta(
            description="Upper bound (as Prometheus writes it: `0.005`, `1.0`, `+Inf`) "
            "to the cumulative count of observations at or below it."
        ),
    ]


Value = Annotated[
    Amount | HistogramValue,
    Meta(description="A counter's value, or a histogram's count, sum and cumulative buckets."),
]
Kind = Literal["counter", "histogram"]


class Series(Struct, forbid_unknown_fields=True):
    name: str
    kind: Kind
    labels: Labels
    value: Value


class NodeCounters(Struct, forbid_unknown_fields=True):
    node: str
    counters: list[Series]


class ClusterSeries(Struct, forbid_unknown_fields=True):
    name: str
    kind: Kind
    labels: Labels
    value: Annotated[Amount | HistogramValue, Meta(description="The sum over every node.")]
    nodes: Annotated[
        dict[str, Value],
        Meta(description="Each node's part of the sum (released and dead nodes too)."),
    ]


class ClusterCounters(Struct, forbid_unknown_fields=True):
    counters: list[ClusterSeries]


class Health(Struct, forbid_unknown_fields=True):
    status: Literal["ok"]


class Ready(Struct, forbid_unknown_fields=True):
    status: Literal["ready"]
    node: str
    epoch: Annotated[int, Meta(ge=1)]
    restored_series: _Count
    restore_seconds: Annotated[float, Meta(ge=0)]
    restoring_since: Annotated[
        float | None,
        Meta(description="Wall-clock time (Unix seconds) the node began claiming its id "
             "and restoring."),
    ]  # fmt: skip
    ready_at: Annotated[
        float | None,
        Meta(description="Wall-clock time (Unix seconds) it was restored and began serving."),
    ]
    claim_expires_in: Annotated[
        Annotated[float, Meta(ge=0)] | None,
        Meta(description="Seconds the coordinator claim is surely still held "
             "(null: no coordinator)."),
    ]  # fmt: skip


class ErrorBody(Struct, forbid_unknown_fields=True):
    code: ErrorCode
    message: str


class Error(Struct, forbid_unknown_fields=True):
    """Every error answer, on every path."""

    error: ErrorBody


# -- decoding an increment ---------------------------------------------------------

_decoder = msgspec.json.Decoder(IncrementRequest)
_FIELD = re.compile(r"`\$\.(\w+)")
_FIELDS = ", ".join(IncrementRequest.__struct_fields__)


def decode_increment(body: bytes) -> IncrementRequest:
    """The increment in ``body``, or the ``HTTPError`` that refuses it:
    400 ``malformed_json`` (not a JSON object), 422 ``invalid_amount`` (``by``),
    422 ``invalid_input`` (anything else)."""
    try:
        return _decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise _refusal(str(exc)) from None
    except msgspec.DecodeError:
        pass
    # Not JSON to msgspec; Python's json also reads NaN, Infinity and lone
    # surrogates ("\ud800"): a body holding them is refused for what it holds.
    try:
        data = json.loads(body.decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise HTTPError(
            400, ErrorCode.MALFORMED_JSON, f"the body is not valid JSON: {exc}"
        ) from None
    except ValueError as exc:  # an integer of thousands of digits
        raise HTTPError(
            422, ErrorCode.INVALID_AMOUNT, f"a number in the body is too large: {exc}"
        ) from None
    try:
        request = msgspec.convert(data, IncrementRequest)
    except msgspec.ValidationError as exc:
        raise _refusal(str(exc)) from None
    if isinstance(request.help, str) and not request.help.isascii():
        try:  # a lone surrogate could never be stored
            request.help.encode("utf-8")
        except UnicodeEncodeError:
            raise HTTPError(
                422,
                ErrorCode.INVALID_INPUT,
                "help is not valid Unicode text (it holds a lone surrogate)",
            ) from None
    return request


def _refusal(detail: str) -> HTTPError:
    """The answer to a body msgspec refused, by the field it names."""
    found = _FIELD.search(detail)
    field = found.group(1) if found else None
    if field is None and detail.startswith("Expected `object`"):
        return HTTPError(400, ErrorCode.MALFORMED_JSON, "the body must be a JSON object")
    if field == "by":
        return HTTPError(
            422, ErrorCode.INVALID_AMOUNT, f"by must be an integer from 0 to 2**63-1 ({detail})"
        )
    if field == "labels":
        message = f'labels must be an object of strings, e.g. {{"route": "/"}} ({detail})'
    elif field == "help":
        message = (
            f"help must be a string of at most {MAX_HELP_LENGTH} characters without control "
            f"characters (newlines, tabs, ...) ({detail})"
        )
    else:
        message = f"{detail}; expected {_FIELDS}"
    return HTTPError(422, ErrorCode.INVALID_INPUT, message)
