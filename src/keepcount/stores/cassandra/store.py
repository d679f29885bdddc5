"""``CassandraStore``: each node id one partition of ``node_rows``, claimed
with a lightweight transaction and fenced by a checkpoint of what the claim
read, read at QUORUM and written as single-partition batches.

Why this layout: ``keepcount.stores.cassandra``.  The fence, its read rule
and the argument that it keeps G4: ``keepcount.stores.cassandra.fence``.
The claim table, the ``incarnation << 32 | seq`` clock and the fencing
checks come from ``keepcount.stores.lww``.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from keepcount.errors import KeepcountError, KeyConflict, OutcomeUnknown, StoreUnavailable
from keepcount.naming import check_node_id
from keepcount.stores.base import (
    ClusterSnapshot,
    FamilyDef,
    KeyRecord,
    NodeRecord,
    SeriesRow,
    Snapshot,
    check_kind,
)
from keepcount.stores.cassandra.fence import (
    CLOCK,
    DEF,
    KEYS,
    FenceStatements,
    View,
    chunk_labels,
    key_counts,
    read_views,
)
from keepcount.stores.cassandra.session import REQUEST_TIMEOUT, connect, parse_url, translate
from keepcount.stores.cassandra.totals import TotalsCache
from keepcount.stores.lww import Claim, Claims, claim_epoch, claim_race, moved_on

__all__ = ["CassandraStore"]

BATCH_ROWS = 500
"""Rows per batch when a claim writes key rows again, or when a flush too
big for one batch is split (a flush without idempotency keys only: a key's
record and its value must stay in one atomic batch).  Single-partition
batches are not held to Cassandra's multi-partition batch size limits; one
mutation must stay under half a commitlog segment (16 MiB by default)."""
CONCURRENT_BATCHES = 8
CONFLICT_READ_TIMEOUT = 0.5
"""Client-side seconds for reading the record of a key another node owns
(normally milliseconds).  Longer, the key is left undecided for the next
flush rather than holding this one past a load balancer's server timeout
(2.5 s on the local clusters, ``cluster.supervisor.answer_timeout``): while
a dead replica is not yet convicted, a QUORUM read of a row being written
can wait the server's whole read timeout (5 s) for it."""


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
        try:
            self._f = FenceStatements(self._session, self.keyspace)
        except BaseException as exc:
            self._cluster.shutdown()
            raise translate(exc, f"store {url}: cannot open") from exc
        self._totals = TotalsCache(url, self._f)
        self._created: dict[str, dict[str, dict[str, float]]] = {}
        """What each claim read of ``created`` times, for the ``load_created`` after it."""
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
        view = self._fence(node, claim)
        claim.restored(view.snapshot())
        self._created[node] = view.created_times()
        self._claims.add(node, claim)
        return new_epoch

    def _fence(self, node: str, claim: Claim) -> View:
        """Steps 2 to 4 of a claim (``fence``): read the partition at QUORUM
        under its fence, write that view as this incarnation's checkpoint,
        then move the fence to this incarnation."""
        view = self._view(node)
        self._checkpoint(node, claim, view)
        self._move_fence(node, claim, view)
        return view

    def _checkpoint(self, node: str, claim: Claim, view: View) -> None:
        """The view's checkpoint chunks and its live key rows, at the claim's base."""
        base = CLOCK.at(claim.generation)
        chunks = [
            (self._f.chunk, (node, name, labels, blob, base))
            for name, labels, blob in view.checkpoint(claim.incarnation)
        ]
        self._batch_rows(chunks, node, "checkpoint", per_batch=1)
        view.parts = len(chunks)
        now = time.time()
        keys = [
            (self._q.key, (node, KEYS, r.labels, r.fingerprint, r.result, r.key_token, r.expires,
                           max(1, int(r.expires - now) + 1), base))
            for r in view.keys
        ]  # fmt: skip
        self._batch_rows(keys, node, "checkpoint")

    def _move_fence(self, node: str, claim: Claim, view: View) -> None:
        """The fence to this incarnation (from then on the read rule ignores
        every older write), then the older checkpoints dropped."""
        base = CLOCK.at(claim.generation)
        self._exec(self._f.fence, (base, claim.incarnation, view.parts, base, node),
                   f"fence node {node!r}", write=True)  # fmt: skip
        older = chunk_labels(claim.incarnation, 0)
        drops = [(self._f.drop, (base, node, name, older[0], older)) for name in view.names()]
        self._batch_rows(drops, node, "drop the older checkpoints of")

    def _batch_rows(
        self,
        statements: list[tuple[Any, tuple[Any, ...]]],
        node: str,
        what: str,
        per_batch: int = BATCH_ROWS,
    ) -> None:
        """Single-partition batches of ``per_batch`` statements, up to
        ``CONCURRENT_BATCHES`` in flight; each is atomic, the whole is not."""

        batches = []
        for start in range(0, len(statements), per_batch):
            batch = self._batch()
            for q, values in statements[start : start + per_batch]:
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

    def vouch(self, node: str, epoch: int, trusted: Callable[[], bool]) -> None:
        self._claims.vouch(node, epoch, trusted)

    def _batch(self) -> Any:
        """A single-partition batch at QUORUM; idempotent (absolute values at
        explicit timestamps): the driver may send it again to another
        coordinator when its own connection broke (``session._retry_policy``)."""
        from cassandra.query import BatchStatement, BatchType

        batch = BatchStatement(BatchType.UNLOGGED, consistency_level=self._cl.QUORUM)
        batch.is_idempotent = True
        return batch

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
        return self._view(node).snapshot()

    def load_created(self, node: str) -> dict[str, dict[str, float]]:
        cached = self._created.pop(node, None)
        return cached if cached is not None else self._view(node).created_times()

    def _view(self, node: str) -> View:
        where = f"store {self.url}: load node {node!r}"
        gather = functools.partial(self._gather_all, what=where)
        return read_views(self.url, self._f, gather, [node], keys=True)[0]

    def read_cluster(self, name: str | None = None) -> ClusterSnapshot:
        nodes = [r.node for r in self._exec(self._q.nodes, (), "read cluster totals")]
        where = f"store {self.url}: read cluster totals"
        return self._totals.read(nodes, name, lambda queries: self._gather_all(queries, where))

    # -- writing -------------------------------------------------------------------

    def write(
        self,
        node: str,
        epoch: int,
        families: Sequence[FamilyDef],
        series: Sequence[SeriesRow],
        keys: Sequence[KeyRecord] = (),
    ) -> None:

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
            self._created.pop(node, None)
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
        batch = self._batch()
        batch.add(self._f.version, (ts, ts, node))  # what cluster totals check first
        for f in families:
            batch.add(self._q.family, (
                node, f.name, DEF, f.kind, f.help, json.dumps(list(f.labelnames)),
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
                node, KEYS, k.key, k.fingerprint, k.result, k.token, k.expires, ttl, ts,
            ))  # fmt: skip
        self._exec(batch, None, f"write node {node!r}", write=True)
        with claim.lock:
            claim.known.update(fresh)
        if claim.trusted is not None and claim.trusted():
            # One round trip: the lease was still trusted after the batch
            # completed, so no newer claim can have read the partition before it.
            return
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
        may be below its fence, so it must not be acknowledged."""
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
        ones another live writer recorded (or is recording), and the ones
        whose owner could not be decided in time (``undecided``).

        One key's trouble is that key's alone: its lightweight transaction
        timing out (a replica died and is not yet convicted, so a contended
        Paxos round waits ``write_request_timeout`` for it), or its owner's
        record not read within ``CONFLICT_READ_TIMEOUT`` (a QUORUM read of
        a row being written there, whose read repair waits for the dead
        replica), makes it undecided; the other keys are written.  Issue
        18's CI: with the whole flush failing instead, every key in it was
        answered 503 and resent to other nodes, which contended for them in
        turn, and one acknowledgement waited 10.6 s.  Only when no key's
        transaction answered is the store itself in trouble: that error is
        raised."""
        now = time.time()
        owned = self._attempt_all(
            [
                (
                    self._q.own,
                    (k.key, node, claim.incarnation, k.token, max(1, int(k.expires - now) + 1)),
                )
                for k in keys
            ],
            f"store {self.url}: record idempotency keys",
            write=True,
        )
        failed = [r for r in owned if isinstance(r, KeepcountError)]
        if failed and len(failed) == len(keys):
            raise failed[0]
        undecided: list[str] = []
        conflicts: list[tuple[KeyRecord, Any]] = []
        for k, result in zip(keys, owned, strict=True):
            if isinstance(result, KeepcountError):
                undecided.append(k.key)  # taken by this attempt, or not: the next flush tells
                continue
            if result.was_applied:
                continue
            owner = result.one()
            if owner.node == node and owner.key_token == k.token:
                continue  # an earlier attempt of this very increment took it
            conflicts.append((k, owner))
        # The owners' key rows, read all at once: one by one, a flush with many
        # conflicting keys (retries of a slow node's requests) takes a QUORUM
        # read per key and turns slow itself.
        records = self._attempt_all(
            [(self._f.key_row, (owner.node, k.key)) for k, owner in conflicts],
            f"store {self.url}: read the keys of other nodes",
            timeout=CONFLICT_READ_TIMEOUT,
        )
        taken: list[str] = []
        busy: list[str] = []
        for (k, owner), rows in zip(conflicts, records, strict=True):
            verdict = "undecided"
            if not isinstance(rows, KeepcountError):
                try:
                    verdict = self._free_to_take(k, owner, node, claim, rows.one())
                except (StoreUnavailable, OutcomeUnknown):
                    pass
            if verdict == "recorded":
                taken.append(k.key)
            elif verdict == "pending":
                busy.append(k.key)
            elif verdict == "undecided":
                undecided.append(k.key)
        if taken or busy or undecided:
            raise KeyConflict(
                f"store {self.url}: idempotency keys already recorded: {taken}; "
                f"being recorded by another node: {busy}; undecided: {undecided}",
                taken,
                busy,
                undecided,
            )

    def _free_to_take(self, k: KeyRecord, owner: Any, node: str, claim: Claim, record: Any) -> str:
        """``"recorded"`` (the owner counted it), ``"pending"`` (the owner, alive,
        may still record it) or ``"mine"`` (taken over); ``record`` is the
        owner's key row (None: not recorded).  A store error here leaves the
        key undecided (the caller's)."""
        where = f"store {self.url}: key {k.key!r}"
        if record is not None and not key_counts(record):
            record = None  # a late write of an incarnation fenced since: never counted
        if record is not None:
            if (record.expires or 0) > time.time():
                return "recorded"  # with its value: the owner counted it
            # recorded but expired (its owner entry outlives it by < 1 s): free
        else:
            row = self._exec(self._q.node, (owner.node,), where).one()
            if not moved_on(row.incarnation if row else None, owner.incarnation):
                return "pending"  # the owner is still the same incarnation: its batch may land
            # The owner's incarnation was re-claimed without the record: its
            # batch can never count now (it is below the new fence).
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
        rows = self._gather([(self._f.key_row, read) for read in reads], where)
        now = time.time()
        for (node, key), r in zip(reads, rows, strict=True):
            if r is not None and key_counts(r) and r.expires is not None and r.expires > now:
                found[key] = KeyRecord(key, node, r.fingerprint, r.result, r.key_token, r.expires)
        return found

    def _gather(self, queries: Sequence[tuple[Any, tuple[Any, ...]]], what: str) -> list[Any]:
        """The first row (or None) of each query, all sent at once."""
        return [rows[0] if rows else None for rows in self._gather_all(queries, what)]

    def _gather_all(
        self, queries: Sequence[tuple[Any, tuple[Any, ...]]], what: str
    ) -> list[list[Any]]:
        """Every row of each query, all sent at once."""
        out = []
        for result in self._attempt_all(queries, what):
            if isinstance(result, KeepcountError):
                raise result
            out.append(list(result))
        return out

    def _attempt_all(
        self,
        queries: Sequence[tuple[Any, tuple[Any, ...]]],
        what: str,
        *,
        write: bool = False,
        timeout: float | None = None,
    ) -> list[Any]:
        """The driver's result of each query, all sent at once, or the
        translated error of each one that failed (``timeout``: client-side
        seconds, else ``REQUEST_TIMEOUT``)."""
        self._claims.check_open()
        wait = REQUEST_TIMEOUT if timeout is None else timeout
        futures = [self._session.execute_async(q, values, timeout=wait) for q, values in queries]
        out: list[Any] = []
        for fut in futures:
            try:
                out.append(fut.result())
            except Exception as exc:
                error = translate(exc, f"{what} failed", write=write)
                error.__cause__ = exc
                out.append(error)
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
