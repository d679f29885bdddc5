"""Naming rules: metric names, label names, label values and node ids.

Metric and label names follow Prometheus' data model so every value can be
exposed unchanged; node ids are restricted further because they name lock
files, Cassandra partitions and coordinator keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from keepcount.errors import InvalidInput

__all__ = [
    "LABEL_NAME_PATTERN",
    "MAX_LABEL_VALUE_LENGTH",
    "METRIC_NAME_PATTERN",
    "RESERVED_SUFFIXES",
    "check_label_names",
    "check_metric_name",
    "check_host_id",
    "check_node_id",
    "label_value",
]

METRIC_NAME_PATTERN = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
"""A metric name (Prometheus' rule); the OpenAPI document states the same pattern."""
LABEL_NAME_PATTERN = r"[a-zA-Z_][a-zA-Z0-9_]*"
_METRIC_NAME = re.compile(METRIC_NAME_PATTERN)
_LABEL_NAME = re.compile(LABEL_NAME_PATTERN)
_HOST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
# A store node id: a host id, or one of its worker slots ("web-1@2", keepcount.slots).
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}(?:@[1-9][0-9]{0,3})?")

MAX_NAME_LENGTH = 200
# Label values are free text in Prometheus; a bound keeps one bad caller from
# writing megabytes per series into every flush and every restore.
MAX_LABEL_VALUE_LENGTH = 1024

# Suffixes the exposition adds to families; a family named with one of them
# would collide with another family's samples.
RESERVED_SUFFIXES = ("_bucket", "_count", "_sum", "_created")


def check_metric_name(name: object) -> str:
    if not isinstance(name, str) or not _METRIC_NAME.fullmatch(name):
        raise InvalidInput(
            f"invalid metric name {name!r}: use letters, digits, '_' and ':', "
            "not starting with a digit"
        )
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidInput(f"metric name is longer than {MAX_NAME_LENGTH} characters")
    if name.endswith(RESERVED_SUFFIXES):
        raise InvalidInput(
            f"invalid metric name {name!r}: the suffixes {', '.join(RESERVED_SUFFIXES)} "
            "are reserved for exposed samples"
        )
    return name


def check_label_names(names: Iterable[object], *, reserved: Sequence[str] = ()) -> tuple[str, ...]:
    if isinstance(names, str):
        raise InvalidInput(f"label names must be a list of strings, not the string {names!r}")
    result: list[str] = []
    for n in names:
        if not isinstance(n, str) or not _LABEL_NAME.fullmatch(n):
            raise InvalidInput(
                f"invalid label name {n!r}: use letters, digits and '_', not starting with a digit"
            )
        if n.startswith("__"):
            raise InvalidInput(f"invalid label name {n!r}: names starting with '__' are reserved")
        if n in reserved:
            raise InvalidInput(f"invalid label name {n!r}: reserved for this metric type")
        if n in result:
            raise InvalidInput(f"duplicate label name {n!r}")
        result.append(n)
    return tuple(result)


def label_value(name: str, value: object) -> str:
    """Return a label value as the string stored, or raise ``InvalidInput``.

    Strings are taken as they are and integers are written in decimal, as
    ``prometheus_client`` does; anything else (None, floats, bools, objects)
    is refused rather than guessed at.
    """
    if type(value) is str:
        s = value
    elif isinstance(value, int) and not isinstance(value, bool):
        s = str(value)
    elif isinstance(value, str):
        s = str.__str__(value)
    else:
        raise InvalidInput(f"label {name!r}: value must be a string, not {type(value).__name__}")
    if len(s) > MAX_LABEL_VALUE_LENGTH:
        raise InvalidInput(
            f"label {name!r}: value is longer than {MAX_LABEL_VALUE_LENGTH} characters"
        )
    if not s.isascii():
        # A lone surrogate (e.g. from JSON "\\ud800") cannot be encoded as
        # UTF-8: every store write holding it would fail, forever.
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInput(
                f"label {name!r}: value is not valid Unicode text (it holds a lone surrogate)"
            ) from None
    return s


def check_node_id(node: object) -> str:
    """A node id as stores hold it: a host id, or a slot of one (``web-1@2``)."""
    return _check_id(node, _NODE_ID)


def check_host_id(node: object) -> str:
    """A node id as a user gives it (``KEEPCOUNT_NODE``): no slot suffix."""
    return _check_id(node, _HOST_ID)


def _check_id(node: object, pattern: re.Pattern[str]) -> str:
    if not isinstance(node, str) or not pattern.fullmatch(node):
        raise InvalidInput(
            f"invalid node id {node!r}: 1-63 characters of letters, digits, '_', '.' and '-', "
            "starting with a letter or digit"
        )
    return node
