# ruff: noqa: S608 - CQL names only the keyspace, which parse_url limits to [a-z0-9_]
"""The Apache Cassandra store: ``cassandra://host1,host2,host3[:port]/keyspace``.

Layout (keyspace created with RF=3, or RF=1 with a warning on a one-node
development cluster)::

    meta(name PRIMARY KEY, val)                        format, format_version
    nodes(node PRIMARY KEY, epoch, incarnation,        claims (lightweight
          claimed_at, released_at, pid, host)          transactions, rare)
    node_rows(node, name, labels, ...,                 ONE PARTITION PER NODE:
              PRIMARY KEY (node, name, labels))        families, series, keys
    key_owner(idem_key PRIMARY KEY, node,              which node recorded an
              incarnation, key_token)                  idempotency key (LWT)

In ``node_rows`` a family definition is the row ``(node, name, '\\x00')``, a
series ``(node, name, <label key>)`` (label keys are JSON arrays), an
idempotency key's record ``(node, '', <key>)``.

**Writes are absolute values, last-write-wins by a logical clock** (DESIGN
§5).  Every flush of a node is one single-partition batch — atomic and
isolated in Cassandra — at QUORUM, every cell ``USING TIMESTAMP`` =
``incarnation << 32 | flush sequence``.  The incarnation is the store's own
claim counter (it only grows, one per claim, in the order of the claims'
epochs), so a newer incarnation's cells always win, whatever wall clocks say,
and a retried write (outcome unknown) is harmless.  Never counter columns:
a timed-out ``c = c + 1`` retried is counted twice (the benchmark compares).

**Fencing.**  ``claim`` takes a new incarnation with a lightweight
transaction on ``nodes``, then *re-asserts the node's partition*: it reads
every row at QUORUM, writes each again at the new incarnation's base
timestamp, then writes a partition tombstone just below it.  From then on a
late batch of an older incarnation (a paused process, a write that was
still in flight) can change nothing: its cells are older than the rewrite or
than the tombstone.  A write that an older incarnation had acknowledged
reached a QUORUM and is in the re-asserted data (QUORUM reads and writes
intersect).  After each batch the writer reads its ``nodes`` row at QUORUM
and raises ``Fenced`` if a newer incarnation claimed meanwhile: the batch
may have lost to it, so it is not acknowledged.

**Idempotency keys** are recorded store-wide exactly once.  A key's record
lives in the writing node's partition, in the same batch as the values (so
it exists iff the counted value does); ``key_owner`` names that node.  A write
first takes ownership of each key with ``INSERT ... IF NOT EXISTS`` (one
lightweight transaction per *keyed* increment — never for plain ones).  A key
owned by another node counts as recorded if its record is in that node's
partition; if it is not, and that node's incarnation has moved on since
(the owner died before its batch, and the re-assertion above means the batch
can never land), ownership is taken over.  Keys expire with Cassandra TTLs.

Driver errors are translated at this seam: a write timeout is
``OutcomeUnknown`` (not acknowledged; the values stay dirty and are written
again), unavailable replicas or no host are ``StoreUnavailable``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from keepcount.errors import (
    ClaimConflict,
    CorruptStore,
    Fenced,
    InvalidInput,
    KeepcountError,
    KeyConflict,
    OutcomeUnknown,
    StoreUnavailable,
)
from keepcount.naming import check_node_id
from keepcount.stores.base import (
    ClusterSnapshot,
    FamilyDef,
    KeyRecord,
    NodeRecord,
    SeriesRow,
    SeriesValue,
    Snapshot,
    check_kind,
    has_buckets,
)

__all__ = ["FORMAT_VERSION", "CassandraStore", "parse_url"]

log = logging.getLogger("keepcount.stores.cassandra")

FORMAT_VERSION = 1
DEFAULT_PORT = 9042
DEFAULT_REPLICATION = 3
REQUEST_TIMEOUT = 10.0
"""Client-side seconds per request; the server's own write timeout (2 s by
default) answers first, as a ``WriteTimeout``: outcome unknown."""
BATCH_ROWS = 500
"""Rows per batch when a claim re-asserts a partition, or when a flush too
big for one batch is split (a flush without idempotency keys only: a key's
record and its value must stay in one atomic batch).  Single-partition
batches are not held to Cassandra's multi-partition batch size limits; one
mutation must stay under half a commitlog segment (16 MiB by default)."""
CONCURRENT_BATCHES = 8

_KEYSPACE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,47}")
_DEF = "\x00"  # the labels of a family-definition row
_KEYS = ""  # the name of an idempotency-key row
_SEQ_BITS = 32
_INSTALL = "pip install 'keepcount[cassandra]'  (or: scripts/setup.sh)"


def parse_url(url: str) -> tuple[list[tuple[str, int]], str]:
    """``cassandra://h1,h2:9043,h3/keyspace`` -> ([(host, port), ...], keyspace)."""
    parts = urlsplit(url)
    if parts.scheme != "cassandra":
        raise InvalidInput(f"not a Cassandra store URL: {url!r}")
    keyspace = parts.path.strip("/")
    if not _KEYSPACE.fullmatch(keyspace):
        raise InvalidInput(
            f"store URL {url!r} needs a keyspace name (letters, digits, _), "
            "e.g. cassandra://10.0.0.1,10.0.0.2,10.0.0.3/counters"
        )
    if len(keyspace) > 48:
        raise InvalidInput(f"keyspace name {keyspace!r} is longer than 48 characters")
    hosts: list[tuple[str, int]] = []
    for item in parts.netloc.split(","):
        host, sep, port = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "")
        if not host or (sep and not port.isdigit()):
            raise InvalidInput(f"store URL {url!r}: bad host {item!r} (expected host[:port])")
        hosts.append((host, int(port) if sep else DEFAULT_PORT))
    if parts.query:
        raise InvalidInput(f"store URL {url!r}: query options are not supported")
    return hosts, keyspace.lower()


def _driver() -> Any:
    try:
        import cassandra.cluster
    except ImportError:  # pragma: no cover - depends on the installation
        raise InvalidInput(f"the Cassandra store needs cassandra-driver: {_INSTALL}") from None
    return cassandra.cluster


@dataclass
class _Claim:
    epoch: int
    incarnation: int
    seq: int = 0
    known: set[tuple[str, str]] = field(default_factory=set)
    """Series written (or restored) under this claim: ``created`` is sent
    only with a series' first write, so it is kept from then on."""
    snapshot: Snapshot | None = None
    """What the claim read, handed to the ``load`` that follows it."""

    def timestamp(self) -> int:
        if self.seq + 1 >= 1 << _SEQ_BITS:
            # 4 billion flushes in one incarnation (years at Cassandra's flush
            # latency): the next would spill into the incarnation's bits.
            raise StoreUnavailable(
                "this incarnation used up its 2**32 flush timestamps; restart the node "
                "(a new claim starts a new incarnation)"
            )
        self.seq += 1
        return (self.incarnation << _SEQ_BITS) | self.seq


class CassandraStore:
    """A ``Store`` on Apache Cassandra; see the module docstring.

    Example::

        store = CassandraStore("cassandra://127.0.0.1,127.0.0.2,127.0.0.3/counters")
        epoch = store.claim("node-1", epoch=42)      # 42: from the coordinator
        store.write("node-1", epoch, [family], [("hits_total", '["/"]', 7, now)])
        store.close()

    Thread-safe (the driver's session is); one handle per process.
    """

    def __init__(self, url: str, *, replication: int | None = None) -> None:
        self.url = url
        hosts, self.keyspace = parse_url(url)
        driver = _driver()
        from cassandra import ConsistencyLevel
        from cassandra.policies import FallthroughRetryPolicy, RoundRobinPolicy

        self._cl = ConsistencyLevel
        profile = driver.ExecutionProfile(
            load_balancing_policy=RoundRobinPolicy(),
            retry_policy=FallthroughRetryPolicy(),  # errors are ours to translate
            consistency_level=ConsistencyLevel.QUORUM,
            serial_consistency_level=ConsistencyLevel.SERIAL,
            request_timeout=REQUEST_TIMEOUT,
        )
        ports = {p for _, p in hosts}
        kwargs: dict[str, Any] = {
            "contact_points": [h for h, _ in hosts],
            "port": ports.pop() if len(ports) == 1 else DEFAULT_PORT,
            "execution_profiles": {driver.EXEC_PROFILE_DEFAULT: profile},
            "protocol_version": 5,
            "connect_timeout": 5,
            "control_connection_timeout": 5,
        }
        if len(ports) > 0:  # several ports: one (host, port) pair each
            kwargs["contact_points"] = hosts
            del kwargs["port"]
        connection_class = _connection_class()
        if connection_class is not None:
            kwargs["connection_class"] = connection_class
        self._lock = threading.Lock()
        self._claims: dict[str, _Claim] = {}
        self._closed = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self._cluster = driver.Cluster(**kwargs)
        try:
            self._session = self._cluster.connect()
            self._setup(replication)
        except BaseException as exc:
            self._cluster.shutdown()
            if isinstance(exc, KeepcountError):
                raise
            raise _translate(exc, f"store {url}: cannot open") from exc

    # -- schema ------------------------------------------------------------------

    def _setup(self, replication: int | None) -> None:
        ks = self.keyspace
        s = self._session
        existing = s.execute(
            "SELECT keyspace_name FROM system_schema.keyspaces WHERE keyspace_name = %s", (ks,)
        ).one()
        if existing is None:
            if replication is None:
                peers = len(list(s.execute("SELECT peer FROM system.peers")))
                replication = min(DEFAULT_REPLICATION, peers + 1)
            if replication < DEFAULT_REPLICATION:
                log.warning(
                    "keyspace %s: replication factor %d (a %d-node cluster); "
                    "acknowledged increments survive the loss of a node only with RF=3",
                    ks, replication, replication,
                )  # fmt: skip
            s.execute(
                f"CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = "
                f"{{'class': 'SimpleStrategy', 'replication_factor': {replication}}}"
            )
        for stmt in _SCHEMA:
            s.execute(stmt.format(ks=ks))
        meta = dict(s.execute(f"SELECT name, val FROM {ks}.meta"))
        if "format" not in meta or "format_version" not in meta:
            # A new store: marked with lightweight transactions, so concurrent
            # first opens agree.  Not at every open: processes opening at once
            # (a host's workers starting) contend on them, and some would fail
            # ("CAS operation result is unknown").
            s.execute(
                f"INSERT INTO {ks}.meta (name, val) VALUES ('format', 'keepcount') IF NOT EXISTS"
            )
            s.execute(
                f"INSERT INTO {ks}.meta (name, val) VALUES ('format_version', %s) IF NOT EXISTS",
                (str(FORMAT_VERSION),),
            )
            meta = dict(s.execute(f"SELECT name, val FROM {ks}.meta"))
        if meta.get("format") != "keepcount":
            raise CorruptStore(f"store {self.url}: keyspace {ks} is not a keepcount store")
        if meta.get("format_version") != str(FORMAT_VERSION):
            raise CorruptStore(
                f"store {self.url}: format version {meta.get('format_version')}; "
                f"this keepcount reads version {FORMAT_VERSION}"
            )
        p = s.prepare
        self._q_node = p(
            f"SELECT epoch, incarnation, released_at, pid, host FROM {ks}.nodes WHERE node = ?"
        )
        self._q_claim_new = p(
            f"INSERT INTO {ks}.nodes (node, epoch, incarnation, claimed_at, released_at, pid, host) "
            "VALUES (?, ?, ?, ?, null, ?, ?) IF NOT EXISTS"
        )
        self._q_claim = p(
            f"UPDATE {ks}.nodes SET epoch = ?, incarnation = ?, claimed_at = ?, released_at = null, "
            "pid = ?, host = ? WHERE node = ? IF incarnation = ?"
        )
        self._q_release = p(f"UPDATE {ks}.nodes SET released_at = ? WHERE node = ? IF epoch = ?")
        self._q_rows = p(
            "SELECT name, labels, ival, sval, created, kind, help, labelnames, buckets, "
            f"fingerprint, result, key_token, expires FROM {ks}.node_rows WHERE node = ?"
        )
        self._q_rows_named = p(
            "SELECT name, labels, ival, sval, kind, help, labelnames, buckets "
            f"FROM {ks}.node_rows WHERE node = ? AND name = ?"
        )
        self._q_created = p(f"SELECT name, labels, created FROM {ks}.node_rows WHERE node = ?")
        self._q_series_i = p(
            f"INSERT INTO {ks}.node_rows (node, name, labels, ival) VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
        )
        self._q_series_s = p(
            f"INSERT INTO {ks}.node_rows (node, name, labels, sval) VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
        )
        self._q_created_w = p(
            f"UPDATE {ks}.node_rows USING TIMESTAMP ? SET created = ? "
            "WHERE node = ? AND name = ? AND labels = ?"
        )
        self._q_family = p(
            f"INSERT INTO {ks}.node_rows (node, name, labels, kind, help, labelnames, buckets) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
        )
        self._q_key = p(
            f"INSERT INTO {ks}.node_rows (node, name, labels, fingerprint, result, key_token, expires) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) USING TTL ? AND TIMESTAMP ?"
        )
        self._q_row_all = p(
            f"INSERT INTO {ks}.node_rows (node, name, labels, ival, sval, created, kind, help, "
            "labelnames, buckets, fingerprint, result, key_token, expires) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TTL ? AND TIMESTAMP ?"
        )
        self._q_tombstone = p(f"DELETE FROM {ks}.node_rows USING TIMESTAMP ? WHERE node = ?")
        self._q_key_row = p(
            f"SELECT fingerprint, result, key_token, expires FROM {ks}.node_rows "
            "WHERE node = ? AND name = '' AND labels = ?"
        )
        self._q_own = p(
            f"INSERT INTO {ks}.key_owner (idem_key, node, incarnation, key_token) VALUES (?, ?, ?, ?) "
            "IF NOT EXISTS USING TTL ?"
        )
        self._q_take = p(
            f"UPDATE {ks}.key_owner USING TTL ? SET node = ?, incarnation = ?, key_token = ? "
            "WHERE idem_key = ? IF key_token = ?"
        )
        self._q_owner = p(
            f"SELECT node, incarnation, key_token FROM {ks}.key_owner WHERE idem_key = ?"
        )
        self._q_nodes = p(f"SELECT node, epoch, claimed_at, released_at FROM {ks}.nodes")

    # -- claims ------------------------------------------------------------------

    def claim(self, node: str, epoch: int | None = None) -> int:
        check_node_id(node)
        with self._lock:
            self._check_open()
            if node in self._claims:
                raise ClaimConflict(f"node {node!r} is already claimed through this handle")
        for _ in range(20):  # a concurrent claim made ours lose: look again
            row = self._exec(self._q_node, (node,), f"claim node {node!r}", serial=True).one()
            stored_epoch = row.epoch if row is not None and row.epoch is not None else 0
            stored_inc = row.incarnation if row is not None and row.incarnation is not None else 0
            if epoch is None:
                # Without a coordinator this store cannot tell a live holder
                # from a dead one (it has no leases): a claim never released
                # stays held.  A coordinator's epoch takes over (see claim()).
                if row is not None and row.released_at is None:
                    raise ClaimConflict(
                        f"node {node!r} is claimed in {self.url} by pid {row.pid} on "
                        f"{row.host} and was never released; if that process is gone, "
                        "claim it with a coordinator's epoch (keepcount node --coordinator)"
                    )
                new_epoch = stored_epoch + 1
            elif epoch < stored_epoch:
                raise Fenced(
                    f"node {node!r}: epoch {epoch} is older than the stored epoch {stored_epoch}"
                )
            else:
                new_epoch = epoch
            incarnation = stored_inc + 1
            args = (time.time(), os.getpid(), socket.gethostname())
            values: tuple[Any, ...]
            if row is None:
                q, values = self._q_claim_new, (node, new_epoch, incarnation, *args)
            else:
                q, values = self._q_claim, (new_epoch, incarnation, *args, node, stored_inc)
            if self._exec(q, values, f"claim node {node!r}").was_applied:
                break
        else:
            raise StoreUnavailable(f"store {self.url}: claims of node {node!r} kept racing")
        claim = _Claim(new_epoch, incarnation)
        claim.snapshot = self._reassert(node, claim)
        with self._lock:
            self._claims[node] = claim
        return new_epoch

    def _reassert(self, node: str, claim: _Claim) -> Snapshot:
        """Read the partition at QUORUM, write it all again at this
        incarnation's base timestamp, then tombstone everything older."""
        from cassandra.query import UNSET_VALUE

        rows = list(self._exec(self._q_rows, (node,), f"load node {node!r}"))
        base = claim.incarnation << _SEQ_BITS
        now = time.time()
        live = []
        statements = []
        for r in rows:
            ttl = 0  # none
            if r.name == _KEYS:
                if r.expires is None or r.expires <= now:
                    continue
                ttl = max(1, int(r.expires - now) + 1)
            live.append(r)
            columns = (
                r.ival, r.sval, r.created, r.kind, r.help, r.labelnames, r.buckets,
                r.fingerprint, r.result, r.key_token, r.expires,
            )  # fmt: skip
            # UNSET, not null: a null would write a tombstone per empty column.
            values = (node, r.name, r.labels,
                      *(UNSET_VALUE if c is None else c for c in columns), ttl, base)  # fmt: skip
            statements.append((self._q_row_all, values))
        self._batch_rows(statements, node)
        self._exec(self._q_tombstone, (base - 1, node), f"fence node {node!r}")
        snap = _snapshot(self.url, node, live)
        claim.known = {(n, k) for n, series in snap.values.items() for k in series}
        return snap

    def _batch_rows(
        self, statements: list[tuple[Any, tuple[Any, ...]]], node: str, what: str = "re-assert"
    ) -> None:
        """Single-partition batches of ``BATCH_ROWS`` statements, up to
        ``CONCURRENT_BATCHES`` in flight; each is atomic, the whole is not."""
        from cassandra.query import BatchStatement, BatchType

        batches = []
        for start in range(0, len(statements), BATCH_ROWS):
            batch = BatchStatement(BatchType.UNLOGGED, consistency_level=self._cl.QUORUM)
            for q, values in statements[start : start + BATCH_ROWS]:
                batch.add(q, values)
            batches.append(batch)
        for start in range(0, len(batches), CONCURRENT_BATCHES):
            futures = [
                self._session.execute_async(b) for b in batches[start : start + CONCURRENT_BATCHES]
            ]
            for fut in futures:
                try:
                    fut.result()
                except Exception as exc:
                    raise _translate(
                        exc, f"store {self.url}: {what} node {node!r}", write=True
                    ) from exc

    def release(self, node: str, epoch: int) -> None:
        with self._lock:
            self._claims.pop(node, None)
            if self._closed:
                return
        self._exec(self._q_release, (time.time(), node, epoch), f"release node {node!r}")

    def nodes(self) -> list[NodeRecord]:
        rows = self._exec(self._q_nodes, (), "list nodes")
        return sorted(
            (NodeRecord(r.node, r.epoch or 0, r.claimed_at, r.released_at) for r in rows),
            key=lambda n: n.node,
        )

    # -- reading -------------------------------------------------------------------

    def load(self, node: str) -> Snapshot:
        with self._lock:
            claim = self._claims.get(node)
            cached = claim.snapshot if claim is not None else None
            if claim is not None:
                claim.snapshot = None
        if cached is not None:
            return cached
        rows = self._exec(self._q_rows, (node,), f"load node {node!r}")
        return _snapshot(self.url, node, [r for r in rows if r.name != _KEYS])

    def load_created(self, node: str) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for r in self._exec(self._q_created, (node,), f"load created times of {node!r}"):
            if r.name != _KEYS and r.labels != _DEF and r.created is not None:
                out.setdefault(r.name, {})[r.labels] = r.created
        return out

    def read_cluster(self, name: str | None = None) -> ClusterSnapshot:
        snap = ClusterSnapshot()
        nodes = [r.node for r in self._exec(self._q_nodes, (), "read cluster totals")]
        futures = []
        for node in nodes:
            if name is None:
                futures.append((node, self._session.execute_async(self._q_rows, (node,))))
            else:
                futures.append(
                    (node, self._session.execute_async(self._q_rows_named, (node, name)))
                )
        for node, fut in futures:
            try:
                rows = fut.result()
            except Exception as exc:
                raise _translate(exc, f"store {self.url}: read cluster totals failed") from exc
            for r in rows:
                if r.name == _KEYS:
                    continue
                if r.labels == _DEF:
                    snap.families.setdefault(node, {})[r.name] = _family(self.url, r)
                else:
                    snap.rows.append((node, r.name, r.labels, _value(self.url, r)))
        snap.rows.sort()
        return snap

    # -- writing -------------------------------------------------------------------

    def write(
        self,
        node: str,
        epoch: int,
        families: Sequence[FamilyDef],
        series: Sequence[SeriesRow],
        keys: Sequence[KeyRecord] = (),
    ) -> None:
        from cassandra.query import BatchStatement, BatchType

        for f in families:
            check_kind(f.kind)
        with self._lock:
            self._check_open()
            claim = self._claims.get(node)
            if claim is None or claim.epoch != epoch:
                raise Fenced(
                    f"node {node!r}: epoch {epoch} is not the claim of this store handle; "
                    "write refused"
                )
            ts = claim.timestamp()
            claim.snapshot = None  # the claim's read is stale from now on
        if keys:
            self._own_keys(node, claim, keys)
        if not keys and len(series) > BATCH_ROWS:
            # A huge flush (a first write of many series): values are absolute
            # and idempotent, so partial batches are safe; only the last one
            # (below) is followed by the fencing check.
            head, series = series[:-BATCH_ROWS], series[-BATCH_ROWS:]
            statements: list[tuple[Any, tuple[Any, ...]]] = []
            for name, labels, value, created in head:
                q = self._q_series_i if isinstance(value, int) else self._q_series_s
                statements.append((q, (node, name, labels, value, ts)))
                if (name, labels) not in claim.known:
                    statements.append((self._q_created_w, (ts, created, node, name, labels)))
            self._batch_rows(statements, node, "write")
            with self._lock:
                claim.known.update((name, labels) for name, labels, _, _ in head)
        batch = BatchStatement(BatchType.UNLOGGED, consistency_level=self._cl.QUORUM)
        for f in families:
            batch.add(self._q_family, (
                node, f.name, _DEF, f.kind, f.help, json.dumps(list(f.labelnames)),
                json.dumps(list(f.buckets[:-1])) if f.buckets else None, ts,
            ))  # fmt: skip
        fresh = []
        for name, labels, value, created in series:
            q = self._q_series_i if isinstance(value, int) else self._q_series_s
            batch.add(q, (node, name, labels, value, ts))
            if (name, labels) not in claim.known:
                batch.add(self._q_created_w, (ts, created, node, name, labels))
                fresh.append((name, labels))
        now = time.time()
        for k in keys:
            ttl = max(1, int(k.expires - now) + 1)
            batch.add(self._q_key, (
                node, _KEYS, k.key, k.fingerprint, k.result, k.token, k.expires, ttl, ts,
            ))  # fmt: skip
        self._exec(batch, None, f"write node {node!r}", write=True)
        with self._lock:
            claim.known.update(fresh)
        self._check_incarnation(node, claim)

    def _check_incarnation(self, node: str, claim: _Claim) -> None:
        """After a batch: if a newer incarnation claimed meanwhile, the batch
        may have lost to its re-assertion, so it must not be acknowledged."""
        row = self._exec(self._q_node, (node,), f"check the claim of node {node!r}").one()
        if row is None or row.incarnation != claim.incarnation:
            with self._lock:
                if self._claims.get(node) is claim:
                    del self._claims[node]
            raise Fenced(
                f"node {node!r}: a newer incarnation ({row.incarnation if row else None}) "
                f"claimed it; this one ({claim.incarnation}) is fenced"
            )

    def _own_keys(self, node: str, claim: _Claim, keys: Sequence[KeyRecord]) -> None:
        """Take ownership of every key or raise ``KeyConflict`` naming the
        ones another live writer recorded (or is recording)."""
        now = time.time()
        pending = [
            (k, self._session.execute_async(
                self._q_own,
                (k.key, node, claim.incarnation, k.token, max(1, int(k.expires - now) + 1)),
            ))
            for k in keys
        ]  # fmt: skip
        taken: list[str] = []
        busy: list[str] = []
        for k, fut in pending:
            try:
                result = fut.result()
            except Exception as exc:
                raise _translate(
                    exc, f"store {self.url}: record key {k.key!r}", write=True
                ) from exc
            if result.was_applied:
                continue
            owner = result.one()
            if owner.node == node and owner.key_token == k.token:
                continue  # an earlier attempt of this very increment took it
            verdict = self._free_to_take(k, owner, node, claim)
            if verdict == "recorded":
                taken.append(k.key)
            elif verdict == "pending":
                busy.append(k.key)
        if taken or busy:
            raise KeyConflict(
                f"store {self.url}: idempotency keys already recorded: {taken}; "
                f"being recorded by another node: {busy}",
                taken,
                busy,
            )

    def _free_to_take(self, k: KeyRecord, owner: Any, node: str, claim: _Claim) -> str:
        """``"recorded"`` (the owner counted it), ``"pending"`` (the owner, alive,
        may still record it) or ``"mine"`` (taken over)."""
        where = f"store {self.url}: key {k.key!r}"
        record = self._exec(self._q_key_row, (owner.node, k.key), where).one()
        if record is not None:
            if (record.expires or 0) > time.time():
                return "recorded"  # with its value: the owner counted it
            # recorded but expired (its owner entry outlives it by < 1 s): free
        else:
            row = self._exec(self._q_node, (owner.node,), where).one()
            if row is None or row.incarnation is None or row.incarnation <= owner.incarnation:
                return "pending"  # the owner is still the same incarnation: its batch may land
            # The owner's incarnation was re-claimed without the record: its
            # batch can never land now (the re-assertion fenced it).
        # Take the key over, unless someone else just did.
        ttl = max(1, int(k.expires - time.time()) + 1)
        values = (ttl, node, claim.incarnation, k.token, k.key, owner.key_token)
        if self._exec(self._q_take, values, where, write=True).was_applied:
            return "mine"
        return "pending"

    def lookup_key(self, key: str) -> KeyRecord | None:
        where = f"store {self.url}: look up key {key!r}"
        owner = self._exec(self._q_owner, (key,), where).one()
        if owner is None:
            return None
        r = self._exec(self._q_key_row, (owner.node, key), where).one()
        if r is None or r.expires is None or r.expires <= time.time():
            return None
        return KeyRecord(key, owner.node, r.fingerprint, r.result, r.key_token, r.expires)

    native_key_expiry = True
    """Keys carry Cassandra TTLs: they expire by themselves, ``expire_keys``
    has nothing to do."""

    def expire_keys(self, now: float, limit: int = 1000) -> int:
        return 0

    # -- plumbing ------------------------------------------------------------------

    def _exec(
        self,
        query: Any,
        values: Any,
        what: str,
        *,
        write: bool = False,
        serial: bool = False,
    ) -> Any:
        self._check_open()
        if serial:  # a Paxos read: sees a claim still in progress
            query = query.bind(values)
            query.consistency_level = self._cl.SERIAL
            values = None
        try:
            return self._session.execute(query, values)
        except Exception as exc:
            raise _translate(exc, f"store {self.url}: {what} failed", write=write) from exc

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable(f"store {self.url} is closed")

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._claims.clear()
        self._cluster.shutdown()

    def __repr__(self) -> str:
        return f"<CassandraStore {self.url}>"


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS {ks}.meta (name text PRIMARY KEY, val text)",
    "CREATE TABLE IF NOT EXISTS {ks}.nodes (node text PRIMARY KEY, epoch bigint, "
    "incarnation bigint, claimed_at double, released_at double, pid int, host text)",
    "CREATE TABLE IF NOT EXISTS {ks}.node_rows (node text, name text, labels text, ival bigint, "
    "sval text, created double, kind text, help text, labelnames text, buckets text, "
    "fingerprint text, result text, key_token text, expires double, "
    "PRIMARY KEY (node, name, labels))",
    "CREATE TABLE IF NOT EXISTS {ks}.key_owner (idem_key text PRIMARY KEY, node text, "
    "incarnation bigint, key_token text)",
)


def _connection_class() -> Any:
    """The driver's reactor: libev when its extension is built (no warnings),
    else asyncio (asyncore, the driver's fallback, is deprecated in 3.11)."""
    try:
        from cassandra.io.libevreactor import LibevConnection

        return LibevConnection
    except ImportError:
        pass
    try:
        from cassandra.io.asyncioreactor import AsyncioConnection

        return AsyncioConnection
    except ImportError:  # pragma: no cover
        return None


def _family(url: str, r: Any) -> FamilyDef:
    try:
        kind = check_kind(r.kind)
        labelnames = tuple(json.loads(r.labelnames or "[]"))
        buckets: tuple[float, ...] = ()
        if has_buckets(kind):
            buckets = (*(float(b) for b in json.loads(r.buckets or "[]")), float("inf"))
    except (ValueError, TypeError) as exc:
        raise CorruptStore(f"store {url}: family {r.name!r} is damaged ({exc})") from None
    return FamilyDef(r.name, kind, r.help or "", labelnames, buckets)


def _value(url: str, r: Any) -> SeriesValue:
    if (r.ival is None) == (r.sval is None):
        raise CorruptStore(
            f"store {url}: series {r.name}{r.labels} holds no value or two: refusing it"
        )
    value: SeriesValue = r.ival if r.ival is not None else r.sval
    return value


def _snapshot(url: str, node: str, rows: Iterable[Any]) -> Snapshot:
    snap = Snapshot()
    series = []
    for r in rows:
        if r.name == _KEYS:
            continue
        if r.labels == _DEF:
            snap.families[r.name] = _family(url, r)
        else:
            series.append(r)
    for r in series:
        family = snap.families.get(r.name)
        value = _value(url, r)
        if family is None or isinstance(value, int) != (family.kind == "counter"):
            raise CorruptStore(
                f"store {url}: node {node!r} holds a series {r.name}{r.labels} that keepcount "
                "cannot have written (no family, or a value of the wrong kind); refusing it"
            )
        snap.values.setdefault(r.name, {})[r.labels] = value
    return snap


def _translate(exc: BaseException, context: str, *, write: bool = False) -> KeepcountError:
    """Driver errors -> keepcount errors (DESIGN: translated at the seam)."""
    import cassandra
    from cassandra.cluster import NoHostAvailable

    name = type(exc).__name__
    if isinstance(
        exc, cassandra.WriteTimeout | cassandra.WriteFailure | cassandra.OperationTimedOut
    ):
        if write or isinstance(exc, cassandra.WriteTimeout | cassandra.WriteFailure):
            return OutcomeUnknown(f"{context}: {name} ({exc}); outcome unknown, not acknowledged")
        return StoreUnavailable(f"{context}: {name} ({exc})")
    if isinstance(exc, cassandra.Unavailable | NoHostAvailable | cassandra.ReadTimeout
                  | cassandra.ReadFailure | cassandra.CoordinationFailure | OSError):  # fmt: skip
        return StoreUnavailable(f"{context}: {name} ({exc})")
    if isinstance(exc, cassandra.InvalidRequest):
        return CorruptStore(f"{context}: the keyspace does not match keepcount's schema ({exc})")
    return StoreUnavailable(f"{context}: {name} ({exc})")
