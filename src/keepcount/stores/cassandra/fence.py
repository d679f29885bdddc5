# ruff: noqa: S608 - CQL names only the keyspace, which parse_url limits to [a-z0-9_]
"""The claim fence of the Cassandra store: a restore that writes a checkpoint,
not every row again (G4 with O(families) writes per claim).

A node's partition of ``node_rows`` holds, besides its rows, two static
cells and a checkpoint:

``fence`` (static)
    The incarnation whose claim finished last.  Its *base* timestamp
    ``F = CLOCK.at(fence)`` splits the partition's cells in two: a cell
    written at ``F`` or later was written by that incarnation (or a later
    one); a cell below ``F`` was written by an older incarnation.
``parts`` (static)
    How many checkpoint chunks the fence's checkpoint has.
checkpoint chunks
    Rows ``(name, "\\x01<fence:020d>:<i:06d>")`` holding, compressed, what
    the claim restored of family ``name``: its definition and every series'
    value and ``created`` time.

**The read rule** (``View.read``; every read of a partition applies it): a
cell below ``F`` counts only through the checkpoint; a cell at ``F`` or
later counts as it is.  So a series' value is its row's value if the
fence's incarnation (or a later one) wrote it, else the checkpoint's value,
else the series does not exist.  Idempotency-key rows, which must stay
rows (``lookup_key`` reads one row), are written again at ``F`` by the
claim; a key row below ``F`` does not count.  A partition without a fence
(a store of format 1, whose claims rewrote every row) counts every cell.

**A claim** (``CassandraStore.claim``): (1) a lightweight transaction
raises the stored incarnation from N to N+1; (2) a QUORUM read of the
partition, merged by the read rule under the fence it finds; (3) the
checkpoint of that view and the live key rows, written at ``F(N+1)``;
(4) one single-partition batch: ``fence = N+1``, ``parts``, and range
deletes of older checkpoints, at ``F(N+1)``.  The claim returns only
after (4).

**Why no late write of an older incarnation can change a restored or
written value** (G4).  Every write of incarnation N carries timestamps
``CLOCK.at(N, seq) < F(N+1)``, whenever it lands (a timed-out batch, a
hint replayed hours later, a read repair).
- Landed before (2): the claim's QUORUM read sees it, so the checkpoint
  holds it as it was read.  An acknowledged write of N always landed
  before (2): N acknowledges only after its batch completed at QUORUM
  and a read of the incarnation (or a coordinator lease it still trusts)
  showed that (1) had not happened yet.
- Lands after (2), before or after (4): its cells are below ``F(N+1)``.
  Once (4) is visible, the read rule ignores them: series N+1 has written
  since are read from N+1's cells, the others from the checkpoint, and a
  series only the late batch knows does not exist.  Before (4) is
  visible no reader can act on N+1's behalf (the claim has not
  returned); a reader of cluster totals may see the late value for that
  moment, as it may see any in-doubt write, and then the restored one.
- Incarnation N+1's own writes carry timestamps above ``F(N+1)`` and win
  over everything N wrote, so the value a reader sees from then on is
  only ever N+1's.
- A claim that dies between (1) and (4) leaves the old fence: the next
  claim (N+2) reads under it, so N's writes that landed meanwhile count
  as landed (they were in doubt, never taken back from anyone: N+1
  served nothing), and its own fence then cuts off N and N+1 alike.
  Chunks of the dead claim carry N+1 in their clustering key and are
  never read under another fence; the next claim's range deletes drop
  them.
- The checkpoint is complete before (4): each chunk was written at
  QUORUM before the fence was sent, so any QUORUM read that sees the
  fence sees every chunk; ``parts`` checks it (``CorruptStore`` if a
  chunk is missing).

The interleavings the conformance suite and ``test_cassandra_fence.py``
drive: a late batch of N before the claim, between (1) and (2), between
(2) and (4), after (4) and before N+1 writes, and after N+1's first
write, on series N+1 has written and has not.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from keepcount.errors import CorruptStore
from keepcount.stores.base import FamilyDef, SeriesValue, Snapshot, check_kind, has_buckets
from keepcount.stores.lww import Clock

__all__ = [
    "CHUNK_SERIES",
    "CLOCK",
    "DEF",
    "FENCE_COLUMNS",
    "KEYS",
    "FenceStatements",
    "View",
    "chunk_labels",
    "ensure_schema",
    "is_checkpoint",
    "key_counts",
    "read_views",
]

CLOCK = Clock(seq_bits=32)
"""Cell timestamps ``incarnation << 32 | flush sequence``."""
DEF = "\x00"
"""The labels of a family-definition row."""
KEYS = ""
"""The name of an idempotency-key row."""
_CKPT = "\x01"
"""The first character of a checkpoint chunk's labels."""
CHUNK_SERIES = 4096
"""Series per checkpoint chunk: a few hundred KiB before compression, far
below Cassandra's mutation limit (half a commitlog segment)."""

_Def = tuple[str, str, str, str | None]
"""kind, help, labelnames (JSON), buckets (JSON, without +Inf) or None."""
_Series = tuple[str, int | str, float | None]
"""labels, value, created."""
_CHUNK = msgspec.msgpack.Decoder(tuple[_Def | None, list[_Series]])
_ENCODE = msgspec.msgpack.Encoder()


def is_checkpoint(labels: str) -> bool:
    return labels.startswith(_CKPT)


def chunk_labels(incarnation: int, index: int) -> str:
    return f"{_CKPT}{incarnation:020d}:{index:06d}"


class FenceStatements:
    """The statements of the fence, prepared once on keyspace ``ks``."""

    SERIES = (
        "name, labels, ival, sval, created, chunk, fence, parts, writetime(ival) AS wt_ival, "
        "writetime(sval) AS wt_sval, writetime(created) AS wt_created"
    )
    """The columns of the partition read: what a series row and a checkpoint
    chunk hold, and the fence.  Definitions and keys have queries of their
    own: their columns would be null in almost every row, and decoding them
    cost a restore half as much again as the read itself."""
    FAMILY = "name, kind, help, labelnames, buckets, writetime(kind) AS wt_kind"
    KEY = "labels, fingerprint, result, key_token, expires, writetime(expires) AS wt_expires"

    def __init__(self, session: Any, ks: str) -> None:
        p = session.prepare
        self.rows = p(f"SELECT {self.SERIES} FROM {ks}.node_rows WHERE node = ?")
        self.rows_named = p(f"SELECT {self.SERIES} FROM {ks}.node_rows WHERE node = ? AND name = ?")
        self.families = p(
            f"SELECT {self.FAMILY} FROM {ks}.node_rows WHERE node = ? AND name IN ? AND labels = ?"
        )
        self.keys = p(f"SELECT {self.KEY} FROM {ks}.node_rows WHERE node = ? AND name = ''")
        self.key_row = p(
            f"SELECT fence, {self.KEY} FROM {ks}.node_rows WHERE node = ? AND name = '' AND labels = ?"
        )
        self.chunk = p(
            f"INSERT INTO {ks}.node_rows (node, name, labels, chunk) VALUES (?, ?, ?, ?) "
            "USING TIMESTAMP ?"
        )
        self.fence = p(
            f"UPDATE {ks}.node_rows USING TIMESTAMP ? SET fence = ?, parts = ?, version = ? "
            "WHERE node = ?"
        )
        self.version = p(f"UPDATE {ks}.node_rows USING TIMESTAMP ? SET version = ? WHERE node = ?")
        self.head = p(f"SELECT DISTINCT node, fence, version FROM {ks}.node_rows WHERE node = ?")
        self.drop = p(
            f"DELETE FROM {ks}.node_rows USING TIMESTAMP ? "
            "WHERE node = ? AND name = ? AND labels >= ? AND labels < ?"
        )
        for statement in vars(self).values():  # reads, or writes at explicit timestamps
            statement.is_idempotent = True


FENCE_COLUMNS = {
    "chunk": "blob",
    "fence": "bigint static",
    "parts": "int static",
    "version": "bigint static",
}
"""The fence's columns of ``node_rows`` (format 2): in a new store's table,
added to a format 1 one by ``ensure_schema``."""


def ensure_schema(run: Callable[..., Any], ks: str) -> None:
    """Add the fence's columns to ``node_rows`` where they are missing (a
    store of format 1, created before them); ``run`` runs a statement on
    the node that makes the schema changes (``session._on_schema_node``)."""
    rows = run(
        "SELECT column_name FROM system_schema.columns "
        "WHERE keyspace_name = %s AND table_name = 'node_rows'",
        (ks,),
    )
    have = {r.column_name for r in rows}
    for column, kind in FENCE_COLUMNS.items():
        if column in have:
            continue
        try:
            run(f"ALTER TABLE {ks}.node_rows ADD {column} {kind}")
        except Exception as exc:  # another process added it first
            if "conflicts with an existing column" not in str(exc) and "already" not in str(exc):
                raise


Gather = Callable[[Sequence[tuple[Any, tuple[Any, ...]]]], list[list[Any]]]
"""Runs queries at once: every row of each."""
_IN = 100  # names per ``IN`` of a definitions read


def read_views(
    url: str,
    f: FenceStatements,
    gather: Gather,
    nodes: Sequence[str],
    name: str | None = None,
    *,
    keys: bool = False,
) -> list[View]:
    """The views of ``nodes``' partitions (or of family ``name`` in each):
    their series rows (and ``keys``: key rows) at once, then the definitions
    of the families those rows name, at once."""
    first: list[tuple[Any, tuple[Any, ...]]] = []
    for node in nodes:
        first.append((f.rows, (node,)) if name is None else (f.rows_named, (node, name)))
        if keys:
            first.append((f.keys, (node,)))
    got = gather(first)
    step = 2 if keys else 1
    rows, key_rows = got[::step], (got[1::step] if keys else [[] for _ in nodes])
    second: list[tuple[Any, tuple[Any, ...]]] = []
    owners: list[int] = []
    for i, (node, part) in enumerate(zip(nodes, rows, strict=True)):
        names = sorted({r.name for r in part if r.labels == DEF})
        for start in range(0, len(names), _IN):
            second.append((f.families, (node, names[start : start + _IN], DEF)))
            owners.append(i)
    definitions: list[list[Any]] = [[] for _ in nodes]
    for i, found in zip(owners, gather(second) if second else [], strict=True):
        definitions[i].extend(found)
    return [
        View.read(url, node, part, definitions[i], key_rows[i], whole=name is None)
        for i, (node, part) in enumerate(zip(nodes, rows, strict=True))
    ]


def key_counts(record: Any) -> bool:
    """Whether a key row (selected with ``fence`` and ``wt_expires``) counts
    under the read rule: written at its partition's fence or later."""
    fence = record.fence or 0
    return record.wt_expires is not None and record.wt_expires >= CLOCK.at(fence)


@dataclass
class View:
    """One node's partition as the read rule sees it (see the module docstring)."""

    url: str
    node: str
    fence: int = 0
    families: dict[str, FamilyDef] = field(default_factory=dict)
    values: dict[str, dict[str, SeriesValue]] = field(default_factory=dict)
    """name -> labels -> value."""
    created: dict[str, dict[str, float]] = field(default_factory=dict)
    """name -> labels -> created time, where one is known."""
    keys: list[Any] = field(default_factory=list)
    """Key rows that count and have not expired."""
    parts: int = 0
    """How many chunks the checkpoint read had (then: the one written)."""

    @classmethod
    def read(
        cls,
        url: str,
        node: str,
        rows: Iterable[Any],
        families: Iterable[Any] = (),
        keys: Iterable[Any] = (),
        *,
        whole: bool = True,
    ) -> View:
        """The view of ``rows`` (``FenceStatements.SERIES``), the definition
        rows (``FAMILY``) and key rows (``KEY``) read with them (``read_views``);
        ``whole``: the whole partition (the checkpoint's ``parts`` are
        checked), not one family."""
        view = cls(url, node)
        chunks: dict[str, list[tuple[str, bytes]]] = {}
        parts: int | None = None
        base = 0
        now = time.time()
        for r in rows:
            if r.fence is not None and r.fence != view.fence:
                view.fence, parts, base = r.fence, r.parts, CLOCK.at(r.fence)
            if r.labels is None or r.name == KEYS or r.labels == DEF:
                continue  # static cells alone, a key, a definition: read apart
            if is_checkpoint(r.labels):
                chunks.setdefault(r.name, []).append((r.labels, r.chunk))
            else:
                value = view._value(r, base)
                if value is not None:
                    view.values.setdefault(r.name, {})[r.labels] = value
                    if r.created is not None and (r.wt_created or 0) >= base:
                        view.created.setdefault(r.name, {})[r.labels] = r.created
        for r in families:
            if (r.wt_kind or 0) >= base:
                view.families[r.name] = _family(
                    url, r.name, r.kind, r.help, r.labelnames, r.buckets
                )
        view.keys = [
            r
            for r in keys
            if (r.wt_expires or 0) >= base and r.expires is not None and r.expires > now
        ]
        view.parts = view._apply(chunks, parts if whole else None)
        return view

    def _value(self, r: Any, base: int) -> SeriesValue | None:
        ival: int | None = r.ival if r.ival is not None and (r.wt_ival or 0) >= base else None
        sval: str | None = r.sval if r.sval is not None and (r.wt_sval or 0) >= base else None
        if ival is not None and sval is not None:
            if r.wt_ival == r.wt_sval:
                raise CorruptStore(
                    f"store {self.url}: node {self.node!r}: series {r.name}{r.labels} holds "
                    "two values written at once; refusing it"
                )
            return ival if r.wt_ival > r.wt_sval else sval
        return ival if ival is not None else sval

    def _apply(self, chunks: dict[str, list[tuple[str, bytes]]], parts: int | None) -> int:
        """Fill in, from the fence's checkpoint, what no cell at the fence or
        later holds; the number of chunks it had."""
        mine = chunk_labels(self.fence, 0)[:21]
        found = 0
        for name, items in chunks.items():
            for labels, blob in items:
                if not labels.startswith(mine):
                    continue  # an older checkpoint, or one of a claim that died
                found += 1
                definition, series = self._decode(name, blob)
                if definition is not None and name not in self.families:
                    self.families[name] = _family(self.url, name, *definition)
                have = self.values.setdefault(name, {})
                when = self.created.setdefault(name, {})
                for lab, value, created in series:
                    have.setdefault(lab, value)
                    if created is not None:
                        when.setdefault(lab, created)
        if self.fence and parts is not None and found != parts:
            raise CorruptStore(
                f"store {self.url}: node {self.node!r}: its checkpoint has {found} of "
                f"{parts} chunks; refusing to restore a partial state"
            )
        return found

    def _decode(self, name: str, blob: bytes | None) -> tuple[_Def | None, list[_Series]]:
        try:
            return _CHUNK.decode(zlib.decompress(blob or b""))
        except (zlib.error, msgspec.DecodeError) as exc:
            raise CorruptStore(
                f"store {self.url}: node {self.node!r}: a checkpoint chunk of {name!r} is "
                f"damaged ({exc}); refusing it"
            ) from None

    def snapshot(self) -> Snapshot:
        """The view as a ``Snapshot``, checked as ``Snapshot.add_series``
        checks each series (a family's values checked in one pass)."""
        snap = Snapshot(families=dict(self.families))
        for name, series in self.values.items():
            family = self.families.get(name)
            counter = family is not None and family.kind == "counter"
            if family is None or any(isinstance(v, int) != counter for v in series.values()):
                for labels, value in series.items():  # names the series, raises
                    snap.add_series(f"store {self.url}", self.node, name, labels, value)
            if series:
                snap.values[name] = dict(series)
        return snap

    def created_times(self) -> dict[str, dict[str, float]]:
        """``Store.load_created``'s answer: the known created times, by family."""
        return {name: dict(when) for name, when in self.created.items() if when}

    def names(self) -> set[str]:
        """Every metric name the view holds (a definition or series)."""
        return self.families.keys() | self.values.keys()

    def checkpoint(self, incarnation: int) -> Iterator[tuple[str, str, bytes]]:
        """(name, labels, compressed chunk) of this view as incarnation
        ``incarnation``'s checkpoint: every family, every series."""
        for name in sorted(self.names()):
            f = self.families.get(name)
            definition: _Def | None = None
            if f is not None:
                buckets = json.dumps(list(f.buckets[:-1])) if f.buckets else None
                definition = (f.kind, f.help, json.dumps(list(f.labelnames)), buckets)
            when = self.created.get(name, {})
            items = [(lab, v, when.get(lab)) for lab, v in self.values.get(name, {}).items()]
            for i, start in enumerate(range(0, max(len(items), 1), CHUNK_SERIES)):
                body = (definition if i == 0 else None, items[start : start + CHUNK_SERIES])
                yield name, chunk_labels(incarnation, i), zlib.compress(_ENCODE.encode(body), 1)


def _family(
    url: str, name: str, kind: Any, help_: Any, labelnames: Any, buckets_json: Any
) -> FamilyDef:
    try:
        checked = check_kind(kind)
        names = tuple(json.loads(labelnames or "[]"))
        buckets: tuple[float, ...] = ()
        if has_buckets(checked):
            buckets = (*(float(b) for b in json.loads(buckets_json or "[]")), float("inf"))
    except (ValueError, TypeError) as exc:
        raise CorruptStore(f"store {url}: family {name!r} is damaged ({exc})") from None
    return FamilyDef(name, checked, help_ or "", names, buckets)
