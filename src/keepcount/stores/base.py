"""The Store seam: what every backend (SQLite, Cassandra, Bigtable) provides.

A store keeps, per node id, the *absolute* value of every series that node
wrote, plus the node's claim epoch.  It never sees a registry or a
coordinator: it takes plain values and an epoch number (DESIGN §4).

Values are opaque to a store: an ``int`` for a counter series, a ``str`` for
a series of any other kind.  A store returns each value exactly as it was
written.

Kinds of families (``FamilyDef.kind``, checked by ``check_kind``):

``"counter"`` and ``"histogram"`` (``NATIVE_KINDS``)
    keepcount's own.  A counter's value is an ``int`` in ``[0, 2**63 - 1]``; a
    histogram's is the JSON text ``[count per bucket..., sum]`` (its encoding
    belongs to ``keepcount.metrics``), one count per bucket of ``buckets``.
``"prometheus.<type>"`` or ``"prometheus.<type>.<variant>"`` (lowercase
letters; e.g. ``"prometheus.counter"``, ``"prometheus.gauge.livesum"``)
    Families of ``keepcount.prometheus``, whose encodings belong to it.  Each
    value is a ``str`` holding valid JSON (any JSON value: ``null`` is the
    writer's tombstone, and arrays may hold strings such as ``"+Inf"`` and
    ``"NaN"``).  The store treats it as opaque text and returns it exactly,
    character for character.  ``"prometheus.histogram"`` uses ``buckets`` as
    ``"histogram"`` does; every other prometheus kind has ``buckets == ()``.

A store refuses to write a definition whose kind ``check_kind`` refuses
(``InvalidInput``; nothing written).  A node holding such a definition, or a
value not of its family's kind (a counter's not an ``int``, any other kind's
not a ``str``; SQLite also checks a histogram's shape and that a prometheus
kind's text is valid JSON), is refused with ``CorruptStore`` by the claim or
load that reads it.  Views that understand only native kinds (cluster
totals, ``/metrics``, the node's HTTP API) skip families of other kinds.

Contract of each method (the conformance suite in
``tests/integration/test_store_conformance.py`` holds every backend to it):

``claim(node, epoch=None) -> int``
    Take the node id for this store handle and return the epoch now held.
    With ``epoch=None`` the store issues it: one more than any epoch ever
    issued for the node, and it fences other holders itself where it can
    (SQLite: an exclusive lock, ``ClaimConflict`` while another process holds
    it).  With an epoch from a coordinator it records that epoch and raises
    ``Fenced`` if a higher one is already recorded.  Once it returns, writes
    carrying a lower epoch are refused.

``load(node) -> Snapshot``
    Every family definition and series value the node wrote, as of the last
    successful ``write``.  Unknown node: an empty snapshot.  A damaged or
    foreign store raises ``CorruptStore``; it never returns a partial or
    empty result in its place.

``load_created(node) -> dict[str, dict[str, float]]``
    metric name -> label key -> the series' ``created`` time (kept from its
    first write).  Apart from ``load`` because only exposition needs it and
    it costs as much to read as the values: the registry reads it after it
    turned ready, beside the flusher, so it must not hold up ``write``.

``write(node, epoch, families, series, keys=()) -> None``
    Atomically upsert family definitions and series values and insert the
    idempotency ``keys`` (``KeyRecord``): all or nothing, durable when it
    returns (SQLite: committed with ``synchronous=FULL``).  Keys are
    store-wide (not per node).  If any key is already recorded and not
    expired, raises ``KeyConflict`` naming every such key (``keys``) and
    writes nothing; an expired record is replaced.  A store that can see a
    key taken by another live writer before its record lands (no transaction
    across partitions) names such keys in ``KeyConflict.pending``: their
    outcome belongs to that writer.
    Idempotent: writing the same absolute values again changes nothing.
    Raises ``Fenced`` if the node's recorded epoch is not ``epoch``,
    ``StoreUnavailable`` if nothing was written (busy, disk full, I/O error),
    ``OutcomeUnknown`` if it cannot tell.  A series' ``created`` time is kept
    from its first write.

``lookup_key(key) -> KeyRecord | None``
    The record of an idempotency key, whichever node wrote it; None if there
    is none or it has expired.

``lookup_keys(keys) -> dict[str, KeyRecord | None]``
    ``lookup_key`` of several keys at once (a flush's conflicting keys): one
    query, or concurrent reads, never one round trip after another.

``expire_keys(now, limit) -> int``
    Delete up to ``limit`` records that expired at ``now``; return how many.
    A store whose records expire by themselves (``native_key_expiry``, e.g.
    Cassandra's TTLs) returns 0.

``read_cluster(name=None) -> ClusterSnapshot``
    Every node's families and series (optionally of one metric name),
    including released and dead nodes: cluster totals are sums over all of
    them.

``nodes() -> list[NodeRecord]``
    Every node id the store has seen, with its epoch and claim times.

``vouch(node, epoch, trusted) -> None``
    A coordinator's lease now backs the claim ``epoch`` of ``node``:
    ``trusted()`` is True only while no newer claim can have been granted
    (its local deadline passes before the lease can expire).  A store that
    must read after a write to learn whether a newer claim fenced it
    (Cassandra) may skip that read when ``trusted()`` is True once the write
    completed: a newer claim comes after the lease expired, so after the
    write.  Stores whose writes are fenced inside the write ignore it.

``release(node, epoch) -> None``
    Give the claim back (a clean shutdown).  Does nothing if ``epoch`` is no
    longer the node's epoch.  The epoch itself is kept: the next claim gets a
    higher one.

``close() -> None``
    Release resources; idempotent.  Claims not released stay recorded.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from keepcount.errors import CorruptStore, Fenced, InvalidInput

__all__ = [
    "BUCKETED_KINDS",
    "NATIVE_KINDS",
    "ClusterSnapshot",
    "FamilyDef",
    "KeyRecord",
    "Kind",
    "NodeRecord",
    "SeriesRow",
    "SeriesValue",
    "Snapshot",
    "Store",
    "check_kind",
    "has_buckets",
    "is_native_kind",
    "next_epoch",
]

SeriesValue = int | str
"""A series' absolute value as stored: int for counters, str for every other kind."""

SeriesRow = tuple[str, str, SeriesValue, float]
"""(metric name, label key, absolute value, created unix time) as written."""

Kind = str
"""A family's kind: one of ``NATIVE_KINDS`` or a prometheus kind (see the module docstring)."""

NATIVE_KINDS = ("counter", "histogram")
"""keepcount's own kinds; every other valid kind starts with ``"prometheus."``."""

BUCKETED_KINDS = ("histogram", "prometheus.histogram")
"""The kinds whose definitions carry ``buckets``."""

_PROMETHEUS_KIND = re.compile(r"prometheus\.[a-z]+(\.[a-z]+)?")


def is_native_kind(kind: str) -> bool:
    """True for ``"counter"`` and ``"histogram"``, false for every other kind."""
    return kind in NATIVE_KINDS


def has_buckets(kind: str) -> bool:
    """True if a family of ``kind`` stores bucket upper bounds."""
    return kind in BUCKETED_KINDS


def check_kind(kind: object) -> str:
    """``kind`` if a store can hold it (native, or ``prometheus.<type>[.<variant>]``
    in lowercase letters); ``InvalidInput`` (a ``ValueError``) otherwise."""
    if isinstance(kind, str) and (kind in NATIVE_KINDS or _PROMETHEUS_KIND.fullmatch(kind)):
        return kind
    raise InvalidInput(
        f"unknown family kind {kind!r}: expected one of {list(NATIVE_KINDS)} "
        "or prometheus.<type>[.<variant>] (lowercase letters)"
    )


def next_epoch(node: str, requested: int | None, stored: int) -> int:
    """The epoch a claim of ``node`` records, given the ``stored`` one (0 for
    a node never claimed): one more when the store issues it (``requested``
    None), else the coordinator's ``requested`` epoch; ``Fenced`` if that is
    older than the stored one (G4: epochs only grow)."""
    if requested is None:
        return stored + 1
    if requested < stored:
        raise Fenced(f"node {node!r}: epoch {requested} is older than the stored epoch {stored}")
    return requested


@dataclass(frozen=True, slots=True)
class FamilyDef:
    """A metric family's definition as stored beside its series."""

    name: str
    kind: Kind
    help: str
    labelnames: tuple[str, ...]
    buckets: tuple[float, ...] = ()
    """Upper bounds of a ``has_buckets`` kind's buckets, ending with +Inf;
    empty for every other kind."""

    def same_shape(self, other: FamilyDef) -> bool:
        return (
            self.kind == other.kind
            and self.labelnames == other.labelnames
            and self.buckets == other.buckets
        )


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """An idempotency key as recorded with the increment it guards."""

    key: str
    node: str
    """The node whose write recorded it."""
    fingerprint: str
    """Digest of the request; the same key with another fingerprint is a misuse."""
    result: str
    """The answer given for it (opaque to the store; JSON of a receipt)."""
    token: str
    """Unique to the one increment that recorded it: lets a writer recognise
    its own earlier write whose outcome it could not tell."""
    expires: float
    """Unix time after which the key is forgotten."""


@dataclass(slots=True)
class Snapshot:
    """One node's stored state: family definitions and raw series values."""

    families: dict[str, FamilyDef] = field(default_factory=dict)
    values: dict[str, dict[str, SeriesValue]] = field(default_factory=dict)
    """metric name -> label key -> value."""

    def series_count(self) -> int:
        return sum(len(v) for v in self.values.values())

    def add_series(self, where: str, node: str, name: str, labels: str, value: SeriesValue) -> None:
        """Add a series as read from store ``where`` (its families added first);
        ``CorruptStore`` if keepcount cannot have written it: no family, or a
        value not of its family's kind (an ``int`` for a counter only)."""
        family = self.families.get(name)
        if family is None or isinstance(value, int) != (family.kind == "counter"):
            raise CorruptStore(
                f"{where}: node {node!r} holds a series {name}{labels} that keepcount "
                "cannot have written (no family, or a value of the wrong kind); refusing it"
            )
        self.values.setdefault(name, {})[labels] = value


@dataclass(frozen=True, slots=True)
class NodeRecord:
    node: str
    epoch: int
    claimed_at: float | None
    released_at: float | None


@dataclass(slots=True)
class ClusterSnapshot:
    """Every node's state, as read in one consistent read where the store allows."""

    families: dict[str, dict[str, FamilyDef]] = field(default_factory=dict)
    """node -> metric name -> definition."""
    rows: list[tuple[str, str, str, SeriesValue]] = field(default_factory=list)
    """(node, metric name, label key, value)."""


@runtime_checkable
class Store(Protocol):
    """A durable home for per-node absolute values; see the module docstring."""

    url: str
    native_key_expiry: bool
    """True if idempotency records expire by themselves (``expire_keys`` is a no-op)."""

    def claim(self, node: str, epoch: int | None = None) -> int: ...

    def load(self, node: str) -> Snapshot: ...

    def load_created(self, node: str) -> dict[str, dict[str, float]]: ...

    def write(
        self,
        node: str,
        epoch: int,
        families: Sequence[FamilyDef],
        series: Sequence[SeriesRow],
        keys: Sequence[KeyRecord] = (),
    ) -> None: ...

    def lookup_key(self, key: str) -> KeyRecord | None: ...

    def lookup_keys(self, keys: Sequence[str]) -> dict[str, KeyRecord | None]: ...

    def expire_keys(self, now: float, limit: int = 1000) -> int: ...

    def read_cluster(self, name: str | None = None) -> ClusterSnapshot: ...

    def nodes(self) -> list[NodeRecord]: ...

    def vouch(self, node: str, epoch: int, trusted: Callable[[], bool]) -> None: ...

    def release(self, node: str, epoch: int) -> None: ...

    def close(self) -> None: ...
