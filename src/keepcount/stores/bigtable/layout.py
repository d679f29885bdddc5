"""The Bigtable store's table layout: row keys, column families, the logical
clock's bit widths and the encodings of every cell (see
``keepcount.stores.bigtable`` for the layout drawn as a table).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from keepcount.errors import CorruptStore
from keepcount.stores.base import FamilyDef, SeriesValue, Snapshot, check_kind, has_buckets
from keepcount.stores.lww import Clock

FORMAT_VERSION = 1

KEY_GC_AGE = 86_400
"""Seconds of the ``max_age`` GC rule of the key families (``k``, ``o``).
A key cell's timestamp is ``expires - KEY_GC_AGE``, so Bigtable's garbage
collection drops it once it expired, whatever the key's own TTL."""

SEQ_BITS = 28
GEN_BITS = 25
"""28 + 25 = 53 bits: the logical clock times 1000 (milliseconds as
microseconds) stays below 2**63."""
MAX_SEQ = (1 << SEQ_BITS) - 1
MAX_GEN = (1 << GEN_BITS) - 1

# Column families and their GC rules (see the module docstring).
META, FAMILY, VALUE, CREATED, KEY, OWNER = "m", "f", "v", "t", "k", "o"
FAMILIES = (META, FAMILY, VALUE, CREATED, KEY, OWNER)
KEY_FAMILIES = (KEY, OWNER)

META_ROW = b"meta"
NODE_PREFIX = b"n#"
NODE_END = b"n$"  # the first key after every "n#..." key
OWNER_PREFIX = b"o#"
OWNER_COL = b"owner"
SEP = b"\x00"
_INT, _STR = b"i", b"s"
DOUBLE = struct.Struct(">d")

CLOCK = Clock(SEQ_BITS, scale=1000)
"""Cell timestamps ``((generation << SEQ_BITS) | seq) * 1000`` (see the module docstring)."""


def node_key(node: str) -> bytes:
    return NODE_PREFIX + node.encode()


def owner_key(key: str) -> bytes:
    return OWNER_PREFIX + key.encode()


# -- encodings ---------------------------------------------------------------------


def i64(n: int) -> bytes:
    return n.to_bytes(8, "big", signed=True)


def as_int(raw: bytes) -> int:
    if len(raw) != 8:
        raise ValueError(f"{len(raw)}-byte integer")
    return int.from_bytes(raw, "big", signed=True)


def cell_column(name: str, labels: str) -> bytes:
    return name.encode() + SEP + labels.encode()


def split_column(qualifier: bytes) -> tuple[str, str]:
    name, sep, labels = qualifier.partition(SEP)
    if not sep:
        raise ValueError(f"column {qualifier!r} has no separator")
    return name.decode(), labels.decode()


def encode_value(value: SeriesValue) -> bytes:
    if isinstance(value, int):
        return _INT + i64(value)
    return _STR + value.encode()


def decode_value(raw: bytes) -> SeriesValue:
    tag, body = raw[:1], raw[1:]
    if tag == _INT:
        return as_int(body)
    if tag == _STR:
        return body.decode()
    raise ValueError(f"value tag {tag!r}")


def encode_family(f: FamilyDef) -> bytes:
    finite = [b for b in f.buckets[:-1]]  # +Inf is implied: strict JSON has no Infinity
    doc = {"kind": f.kind, "help": f.help, "labelnames": list(f.labelnames), "buckets": finite}
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_family(name: str, raw: bytes) -> FamilyDef:
    doc = json.loads(raw)
    kind = check_kind(doc["kind"])
    labelnames = tuple(str(n) for n in doc["labelnames"])
    buckets: tuple[float, ...] = ()
    if has_buckets(kind):
        buckets = (*(float(b) for b in doc["buckets"]), float("inf"))
    return FamilyDef(name, kind, str(doc["help"]), labelnames, buckets)


def key_timestamp(expires: float) -> int:
    """A key cell's timestamp (µs, millisecond-aligned): its ``max_age`` GC
    rule drops it ``KEY_GC_AGE`` seconds after this, i.e. once it expired."""
    ms = max(0, int(expires * 1000) - KEY_GC_AGE * 1000)
    return ms * 1000


def to_json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


@dataclass(frozen=True)
class Owner:
    """An ``o#<key>`` entry as read, with its exact bytes (the compare-and-set operand)."""

    raw: bytes
    node: str
    incarnation: int
    token: str
    expires: float

    @classmethod
    def parse(cls, raw: bytes) -> Owner:
        doc = json.loads(raw)
        return cls(raw, doc["node"], int(doc["inc"]), doc["token"], float(doc["expires"]))


def decode_node(where: str, node: str, cells: Iterable[Any]) -> Snapshot:
    """A node's families and values from the cells of its row; ``CorruptStore``
    if any is damaged or could not have been written by keepcount."""
    snap = Snapshot()
    series = []
    try:
        for c in cells:
            if c.family == FAMILY:
                name = c.qualifier.decode()
                snap.families[name] = decode_family(name, c.value)
            else:
                series.append((*split_column(c.qualifier), c.value))
        for name, labels, raw in series:
            snap.add_series(where, node, name, labels, decode_value(raw))
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptStore(
            f"{where}: node {node!r} holds a damaged cell ({exc}); refusing it"
        ) from None
    return snap
