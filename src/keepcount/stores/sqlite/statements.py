"""The SQL the SQLite store runs on a node's rows, and rows <-> ``FamilyDef``.

Statements with many rows are built per row count and cached: one statement
per flush rather than one per row (see ``SERIES_PER_STATEMENT``).
"""

from __future__ import annotations

import functools
import json
import math
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from keepcount.errors import CorruptStore, Fenced, InvalidInput
from keepcount.stores.base import FamilyDef, SeriesRow, check_kind, has_buckets
from keepcount.stores.sqlite.checksums import family_crc, series_crc

# The first of a node's rows this format cannot hold: a series without its
# family, a counter that is not a non-negative integer, a histogram that is not
# a JSON array of one count per bucket (the finite ones and +Inf) plus the sum,
# a prometheus kind's value that is not valid JSON text, a family of any other
# kind.  Run by claim() before it writes anything: a damaged node is refused
# with the file untouched.
FIND_DAMAGE = """
SELECT s.name, s.labels, typeof(s.value), f.kind FROM series s
LEFT JOIN families f ON f.node = s.node AND f.name = s.name
WHERE s.node = ?1 AND (
    f.kind IS NULL
    OR CASE
        WHEN f.kind = 'counter' THEN typeof(s.value) != 'integer' OR s.value < 0
        WHEN f.kind = 'histogram' THEN typeof(s.value) != 'text' OR NOT json_valid(s.value)
             OR json_array_length(s.value) != json_array_length(f.buckets) + 2
        WHEN f.kind GLOB 'prometheus.*' THEN typeof(s.value) != 'text' OR NOT json_valid(s.value)
        ELSE 1
    END)
LIMIT 1
"""

# The stored kind, labelnames and buckets stay, so their checksum stays too.
UPSERT_FAMILY = (
    "INSERT INTO families(node, name, kind, help, labelnames, buckets, crc) "
    "VALUES (?,?,?,?,?,?,?) ON CONFLICT(node, name) DO UPDATE SET help = excluded.help"
)
_T = TypeVar("_T")

# Rows per multi-row statement.  One statement per flush rather than one
# per row: the sqlite3 module releases the GIL around every statement step,
# and each time the flusher thread takes it back from a busy event loop it
# may wait a whole switch interval.  6 or 7 parameters a row stays far under
# SQLite's 32,766 variables per statement.
SERIES_PER_STATEMENT = 500
KEYS_PER_STATEMENT = 500


@functools.lru_cache(maxsize=64)
def upsert_series(rows: int) -> str:
    return (
        "INSERT INTO series(node, name, labels, value, created, crc) VALUES "  # noqa: S608 - only ?s
        + ",".join(["(?,?,?,?,?,?)"] * rows)
        + " ON CONFLICT(node, name, labels) DO UPDATE SET value = excluded.value, crc = excluded.crc"
    )


@functools.lru_cache(maxsize=64)
def upsert_series_fenced(rows: int) -> str:
    # INSERT ... SELECT with ON CONFLICT needs a WHERE (SQLite's parsing
    # ambiguity); this one is the epoch check.
    return (
        "INSERT INTO series(node, name, labels, value, created, crc) "  # noqa: S608 - only ?s
        "SELECT * FROM (VALUES " + ",".join(["(?,?,?,?,?,?)"] * rows) + ") "
        "WHERE (SELECT epoch FROM nodes WHERE node = ?) = ? "
        "ON CONFLICT(node, name, labels) DO UPDATE SET value = excluded.value, crc = excluded.crc"
    )


def check_epoch(c: sqlite3.Connection, node: str, epoch: int) -> None:
    row = c.execute("SELECT epoch FROM nodes WHERE node = ?", (node,)).fetchone()
    if row is None or row[0] != epoch:
        raise Fenced(
            f"node {node!r}: epoch {epoch} was superseded by epoch "
            f"{row[0] if row else None}; write refused"
        )


@functools.lru_cache(maxsize=64)
def live_keys(keys: int) -> str:
    marks = ",".join("?" * keys)
    return f"SELECT key FROM idempotency WHERE key IN ({marks}) AND expires > ?"  # noqa: S608


@functools.lru_cache(maxsize=64)
def insert_keys(keys: int) -> str:
    # Replaces an expired record (the last parameter is now); live ones were
    # refused before it runs.
    return (
        "INSERT INTO idempotency(key, node, fingerprint, result, token, expires, crc) VALUES "  # noqa: S608
        + ",".join(["(?,?,?,?,?,?,?)"] * keys)
        + " ON CONFLICT(key) DO UPDATE SET node = excluded.node, "
        "fingerprint = excluded.fingerprint, result = excluded.result, token = excluded.token, "
        "expires = excluded.expires, crc = excluded.crc WHERE idempotency.expires <= ?"
    )


def chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def family_def(
    path: Path, name: str, kind: str, help_: str, labelnames: str, buckets: str
) -> FamilyDef:
    try:
        check_kind(kind)
    except InvalidInput:
        raise CorruptStore(f"store {path}: {name!r} has unknown kind {kind!r}") from None
    try:
        names = tuple(json.loads(labelnames))
        finite = [float(b) for b in json.loads(buckets)]
        bounds = (*finite, math.inf) if has_buckets(kind) else ()
    except (ValueError, TypeError) as exc:
        raise CorruptStore(f"store {path}: definition of {name!r} is unreadable: {exc}") from exc
    return FamilyDef(name, kind, help_, names, bounds)


def family_row(node: str, f: FamilyDef) -> tuple[Any, ...]:
    finite = [b for b in f.buckets if b != math.inf]  # +Inf is implied: strict JSON has no Infinity
    labelnames, buckets = json.dumps(f.labelnames), json.dumps(finite)
    crc = family_crc(node, f.name, f.kind, labelnames, buckets)
    return (node, f.name, f.kind, f.help, labelnames, buckets, crc)


def series_params(node: str, series: Sequence[SeriesRow]) -> list[object]:
    """The parameters of ``upsert_series(len(series))``: each row with its
    node and checksum."""
    values: list[object] = []
    for name, labels, value, created in series:
        values += (node, name, labels, value, created, series_crc(node, name, labels, value))
    return values
