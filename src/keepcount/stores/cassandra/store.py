"""``CassandraStore``: each node id one partition of ``node_rows``, claimed
with a lightweight transaction and re-asserted at the new incarnation, read
at QUORUM and written as single-partition batches.

Why this layout and how it fences: ``keepcount.stores.cassandra``.  The
claim table, the ``incarnation << 32 | seq`` clock and the fencing checks
come from ``keepcount.stores.lww``.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any

from keepcount.errors import CorruptStore, KeyConflict, StoreUnavailable
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
from keepcount.stores.cassandra.session import connect, parse_url, translate
from keepcount.stores.lww import Claim, Claims, Clock, claim_epoch, claim_race, moved_on

__all__ = ["CassandraStore"]

BATCH_ROWS = 500
"""Rows per batch when a claim re-asserts a partition, or when a flush too
big for one batch is split (a flush without idempotency keys only: a key's
record and its value must stay in one atomic batch).  Single-partition
batches are not held to Cassandra's multi-partition batch size limits; one
mutation must stay under half a commitlog segment (16 MiB by default)."""
CONCURRENT_BATCHES = 8

CLOCK = Clock(seq_bits=32)
"""Cell timestamps ``incarnation << 32 | flush sequence``."""
_DEF = "\x00"  # the labels of a family-definition row
_KEYS = ""  # the name of an idempotency-key row


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
        self._claims = Claims(f"store {url}")
        self._cluster, self._session, self._q = connect(url, hosts, self.keyspace, replication)
        from cassandra import ConsistencyLevel

        self._cl = ConsistencyLevel

    # -- claims ------------------------------------------------------------------

    def claim(self, node: str, epoch: int | None = None) -> int:
        check_node_id(node)
        self._claims.begin(node)

        def attempt() -> tuple[int, int] | None:
            """One lightweight transaction taking the next incarnation; None if
            a concurrent claim made it lose."""
            row = self._exec(self._q.node, (node,), f"claim node {node!r}", serial=True).one()
            stored_epoch = row.epoch if row is not None and row.epoch is not None else 0
            stored_inc = row.incarnation if row is not None and row.incarnation is not None else 0
            holder = (row.pid, row.host) if row is not None and row.released_at is None else None
            new_epoch = claim_epoch(self.url, node, epoch, stored_epoch, holder)
            incarnation = stored_inc + 1
            args = (time.time(), os.getpid(), socket.gethostname())
            values: tuple[Any, ...]
            if row is None:
                q, values = self._q.claim_new, (node, new_epoch, incarnation, *args)
            else:
                q, values = self._q.claim, (new_epoch, incarnation, *args, node, stored_inc)
            if self._exec(q, values, f"claim node {node!r}").was_applied:
                return new_epoch, incarnation
            return None

        new_epoch, incarnation = claim_race(attempt, f"store {self.url}", node)
        claim = Claim(new_epoch, incarnation, generation=incarnation)
        claim.restored(self._reassert(node, claim))
        self._claims.add(node, claim)
        return new_epoch

    def _reassert(self, node: str, claim: Claim) -> Snapshot:
        """Read the partition at QUORUM, write it all again at this
        incarnation's base timestamp, then tombstone everything older."""
        from cassandra.query import UNSET_VALUE

        rows = list(self._exec(self._q.rows, (node,), f"load node {node!r}"))
        base = CLOCK.at(claim.generation)
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
            statements.append((self._q.row_all, values))
        self._batch_rows(statements, node)
        self._exec(self._q.tombstone, (base - 1, node), f"fence node {node!r}")
        return _snapshot(self.url, node, live)

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
                    raise translate(
                        exc, f"store {self.url}: {what} node {node!r}", write=True
                    ) from exc

    def release(self, node: str, epoch: int) -> None:
        _, is_open = self._claims.release(node)
        if not is_open:
            return
        self._exec(self._q.release, (time.time(), node, epoch), f"release node {node!r}")

    def nodes(self) -> list[NodeRecord]:
        rows = self._exec(self._q.nodes, (), "list nodes")
        return sorted(
            (NodeRecord(r.node, r.epoch or 0, r.claimed_at, r.released_at) for r in rows),
            key=lambda n: n.node,
        )

    # -- reading -------------------------------------------------------------------

    def load(self, node: str) -> Snapshot:
        cached = self._claims.take_snapshot(node)
        if cached is not None:
            return cached
        rows = self._exec(self._q.rows, (node,), f"load node {node!r}")
        return _snapshot(self.url, node, [r for r in rows if r.name != _KEYS])

    def load_created(self, node: str) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for r in self._exec(self._q.created, (node,), f"load created times of {node!r}"):
            if r.name != _KEYS and r.labels != _DEF and r.created is not None:
                out.setdefault(r.name, {})[r.labels] = r.created
        return out

    def read_cluster(self, name: str | None = None) -> ClusterSnapshot:
        snap = ClusterSnapshot()
        nodes = [r.node for r in self._exec(self._q.nodes, (), "read cluster totals")]
        futures = []
        for node in nodes:
            if name is None:
                futures.append((node, self._session.execute_async(self._q.rows, (node,))))
            else:
                futures.append(
                    (node, self._session.execute_async(self._q.rows_named, (node, name)))
                )
        for node, fut in futures:
            try:
                rows = fut.result()
            except Exception as exc:
                raise translate(exc, f"store {self.url}: read cluster totals failed") from exc
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
        claim = self._claims.held(node, epoch)
        with claim.lock:
            if claim.exhausted(CLOCK.max_seq):
                # 4 billion flushes in one incarnation (years at Cassandra's
                # flush latency): the next would spill into the incarnation's bits.
                raise StoreUnavailable(
                    "this incarnation used up its 2**32 flush timestamps; restart the node "
                    "(a new claim starts a new incarnation)"
                )
            ts = claim.tick(CLOCK)
            claim.snapshot = None  # the claim's read is stale from now on
        if keys:
            self._own_keys(node, claim, keys)
        if not keys and len(series) > BATCH_ROWS:
            # A huge flush (a first write of many series): values are absolute
            # and idempotent, so partial batches are safe; only the last one
            # (below) is followed by the fencing check.
            head, series = series[:-BATCH_ROWS], series[-BATCH_ROWS:]
            self._batch_rows(self._series(node, claim, ts, head), node, "write")
            with claim.lock:
                claim.known.update((name, labels) for name, labels, _, _ in head)
        batch = BatchStatement(BatchType.UNLOGGED, consistency_level=self._cl.QUORUM)
        for f in families:
            batch.add(self._q.family, (
                node, f.name, _DEF, f.kind, f.help, json.dumps(list(f.labelnames)),
                json.dumps(list(f.buckets[:-1])) if f.buckets else None, ts,
            ))  # fmt: skip
        fresh = [
            (name, labels) for name, labels, _, _ in series if (name, labels) not in claim.known
        ]
        for q, values in self._series(node, claim, ts, series):
            batch.add(q, values)
        now = time.time()
        for k in keys:
            ttl = max(1, int(k.expires - now) + 1)
            batch.add(self._q.key, (
                node, _KEYS, k.key, k.fingerprint, k.result, k.token, k.expires, ttl, ts,
            ))  # fmt: skip
        self._exec(batch, None, f"write node {node!r}", write=True)
        with claim.lock:
            claim.known.update(fresh)
        self._check_incarnation(node, claim)

    def _series(
        self, node: str, claim: Claim, ts: int, series: Sequence[SeriesRow]
    ) -> list[tuple[Any, tuple[Any, ...]]]:
        """The statements writing ``series`` at ``ts``; ``created`` only with a
        series' first write under ``claim``."""
        statements: list[tuple[Any, tuple[Any, ...]]] = []
        for name, labels, value, created in series:
            q = self._q.series_i if isinstance(value, int) else self._q.series_s
            statements.append((q, (node, name, labels, value, ts)))
            if (name, labels) not in claim.known:
                statements.append((self._q.created_w, (ts, created, node, name, labels)))
        return statements

    def _check_incarnation(self, node: str, claim: Claim) -> None:
        """After a batch: if a newer incarnation claimed meanwhile, the batch
        may have lost to its re-assertion, so it must not be acknowledged."""
        row = self._exec(self._q.node, (node,), f"check the claim of node {node!r}").one()
        current = row.incarnation if row else None
        self._claims.check(
            node,
            claim,
            current,
            f"node {node!r}: a newer incarnation ({current}) claimed it; "
            f"this one ({claim.incarnation}) is fenced",
        )

    def _own_keys(self, node: str, claim: Claim, keys: Sequence[KeyRecord]) -> None:
        """Take ownership of every key or raise ``KeyConflict`` naming the
        ones another live writer recorded (or is recording)."""
        now = time.time()
        pending = [
            (k, self._session.execute_async(
                self._q.own,
                (k.key, node, claim.incarnation, k.token, max(1, int(k.expires - now) + 1)),
            ))
            for k in keys
        ]  # fmt: skip
        conflicts: list[tuple[KeyRecord, Any]] = []
        for k, fut in pending:
            try:
                result = fut.result()
            except Exception as exc:
                raise translate(exc, f"store {self.url}: record key {k.key!r}", write=True) from exc
            if result.was_applied:
                continue
            owner = result.one()
            if owner.node == node and owner.key_token == k.token:
                continue  # an earlier attempt of this very increment took it
            conflicts.append((k, owner))
        # The owners' key rows, read all at once: one by one, a flush with many
        # conflicting keys (retries of a slow node's requests) takes a QUORUM
        # read per key and turns slow itself.
        records = self._gather(
            [(self._q.key_row, (owner.node, k.key)) for k, owner in conflicts],
            f"store {self.url}: read the keys of other nodes",
        )
        taken: list[str] = []
        busy: list[str] = []
        for (k, owner), record in zip(conflicts, records, strict=True):
            verdict = self._free_to_take(k, owner, node, claim, record)
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

    def _free_to_take(self, k: KeyRecord, owner: Any, node: str, claim: Claim, record: Any) -> str:
        """``"recorded"`` (the owner counted it), ``"pending"`` (the owner, alive,
        may still record it) or ``"mine"`` (taken over); ``record`` is the
        owner's key row (None: not recorded)."""
        where = f"store {self.url}: key {k.key!r}"
        if record is not None:
            if (record.expires or 0) > time.time():
                return "recorded"  # with its value: the owner counted it
            # recorded but expired (its owner entry outlives it by < 1 s): free
        else:
            row = self._exec(self._q.node, (owner.node,), where).one()
            if not moved_on(row.incarnation if row else None, owner.incarnation):
                return "pending"  # the owner is still the same incarnation: its batch may land
            # The owner's incarnation was re-claimed without the record: its
            # batch can never land now (the re-assertion fenced it).
        # Take the key over, unless someone else just did.
        ttl = max(1, int(k.expires - time.time()) + 1)
        values = (ttl, node, claim.incarnation, k.token, k.key, owner.key_token)
        if self._exec(self._q.take, values, where, write=True).was_applied:
            return "mine"
        return "pending"

    def lookup_key(self, key: str) -> KeyRecord | None:
        return self.lookup_keys([key])[key]

    def lookup_keys(self, keys: Sequence[str]) -> dict[str, KeyRecord | None]:
        """Each key's owner, then the owners' key rows: two rounds of
        concurrent reads, whatever the number of keys."""
        where = f"store {self.url}: look up keys"
        found: dict[str, KeyRecord | None] = dict.fromkeys(keys)
        owners = self._gather([(self._q.owner, (key,)) for key in found], where)
        reads = [(o.node, key) for key, o in zip(found, owners, strict=True) if o is not None]
        rows = self._gather([(self._q.key_row, read) for read in reads], where)
        now = time.time()
        for (node, key), r in zip(reads, rows, strict=True):
            if r is not None and r.expires is not None and r.expires > now:
                found[key] = KeyRecord(key, node, r.fingerprint, r.result, r.key_token, r.expires)
        return found

    def _gather(self, queries: Sequence[tuple[Any, tuple[Any, ...]]], what: str) -> list[Any]:
        """The first row (or None) of each query, all sent at once."""
        self._claims.check_open()
        futures = [self._session.execute_async(q, values) for q, values in queries]
        out = []
        for fut in futures:
            try:
                out.append(fut.result().one())
            except Exception as exc:
                raise translate(exc, f"{what} failed") from exc
        return out

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
        self._claims.check_open()
        if serial:  # a Paxos read: sees a claim still in progress
            query = query.bind(values)
            query.consistency_level = self._cl.SERIAL
            values = None
        try:
            return self._session.execute(query, values)
        except Exception as exc:
            raise translate(exc, f"store {self.url}: {what} failed", write=write) from exc

    def close(self) -> None:
        if self._claims.close():
            self._cluster.shutdown()

    def __repr__(self) -> str:
        return f"<CassandraStore {self.url}>"


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
        snap.add_series(f"store {url}", node, r.name, r.labels, _value(url, r))
    return snap
