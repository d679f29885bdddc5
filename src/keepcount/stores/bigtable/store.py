"""``BigtableStore``: each node id one row, claimed and written with
CheckAndMutateRow conditioned on the row's ``m:inc`` cell (the incarnation).

The table layout, the clock's bits and why a conditional write per flush
fences: ``keepcount.stores.bigtable``.  The claim table, the clock and the
fencing checks come from ``keepcount.stores.lww``.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable, Sequence

from keepcount.errors import CorruptStore, Fenced, KeepcountError, KeyConflict, StoreUnavailable
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
from keepcount.stores.bigtable.client import (
    EMULATOR_ENV,
    close_clients,
    data_client,
    library,
    parse_url,
    translate,
)
from keepcount.stores.bigtable.keys import KeyOwners
from keepcount.stores.bigtable.layout import (
    CLOCK,
    CREATED,
    DOUBLE,
    FAMILY,
    KEY,
    MAX_GEN,
    MAX_SEQ,
    META,
    NODE_PREFIX,
    SEP,
    VALUE,
    as_int,
    cell_column,
    decode_family,
    decode_node,
    decode_value,
    encode_family,
    encode_value,
    i64,
    key_timestamp,
    node_key,
    split_column,
    to_json,
)
from keepcount.stores.bigtable.table import Table
from keepcount.stores.lww import Claim, Claims, claim_epoch, claim_race

__all__ = ["MUTATIONS_PER_REQUEST", "REQUEST_TIMEOUT", "BigtableStore"]

REQUEST_TIMEOUT = 10.0
"""Default seconds per operation (``BigtableStore(timeout=...)``), the client's
retries of a read included.  A write is never retried by the client (a
conditional write is not idempotent to it): one that runs out of time is
``OutcomeUnknown``, and the next flush writes the same absolute values
again.  The schema checks at open are single attempts: the node retries
opening a store it cannot reach."""

MUTATIONS_PER_REQUEST = 50_000
"""Mutations per conditional write.  Bigtable refuses more than 100,000 in
one request; half of that leaves room and keeps one request well under its
size limits (a mutation of a series is ~50-100 bytes)."""


class BigtableStore:
    """A ``Store`` on Google Cloud Bigtable (or its emulator); see the module docstring.

    Example::

        store = BigtableStore("bigtable://my-project/my-instance/counters")
        epoch = store.claim("node-1", epoch=42)      # 42: from the coordinator
        store.write("node-1", epoch, [family], [("hits_total", '["/"]', 7, now)])
        store.close()

    Thread-safe (the client library's data client is); writes of one node
    id are serialised (the group commit issues one at a time anyway).
    """

    native_key_expiry = True
    """Key cells expire through their families' ``max_age`` GC rule:
    ``expire_keys`` has nothing to do."""

    def __init__(self, url: str, *, timeout: float = REQUEST_TIMEOUT) -> None:
        self.url = url
        self.timeout = timeout
        self.location = parse_url(url)
        self.emulator = self.location.emulator or os.environ.get(EMULATOR_ENV) or None
        self.mutations_per_request = MUTATIONS_PER_REQUEST
        """Mutations per conditional write (``MUTATIONS_PER_REQUEST``; tests lower it)."""
        self.max_seq = MAX_SEQ
        """Flushes per generation before a renewal (``MAX_SEQ``; tests lower it)."""
        data = library()
        loc = self.location
        self._where = f"store {url}"
        self._claims = Claims(self._where)
        try:
            self._client = data_client(data, loc.project, self.emulator)
        except Exception as exc:
            raise translate(exc, f"{self._where}: cannot open") from exc
        table: Table | None = None
        try:
            table = Table(
                data,
                self._client.get_table(
                    loc.instance,
                    loc.table,
                    app_profile_id=loc.app_profile,
                    default_read_rows_operation_timeout=timeout,
                    default_read_rows_attempt_timeout=timeout,
                    default_mutate_rows_operation_timeout=timeout,
                    default_mutate_rows_attempt_timeout=timeout,
                    default_operation_timeout=timeout,
                    default_attempt_timeout=timeout,
                ),
                self._where,
                timeout,
                self._claims.check_open,
            )
            table.setup(loc, self.emulator)
        except BaseException as exc:
            close_clients(self._where, self._client, None if table is None else table.admin)
            if isinstance(exc, KeepcountError):
                raise
            raise translate(exc, f"{self._where}: cannot open") from exc
        self._t = table
        self._keys = KeyOwners(table)

    def claim(self, node: str, epoch: int | None = None) -> int:
        check_node_id(node)
        self._claims.begin(node)
        key = node_key(node)
        t = self._t

        def attempt() -> tuple[int, int, int] | None:
            """One conditional write raising the row's ``m:inc``; None if a
            concurrent claim made it lose."""
            meta = t.read_meta(node)
            try:
                stored_epoch = as_int(meta[b"epoch"]) if b"epoch" in meta else 0
                stored_inc = as_int(meta[b"inc"]) if b"inc" in meta else None
                stored_gen = as_int(meta[b"gen"]) if b"gen" in meta else 0
            except ValueError as exc:
                raise CorruptStore(
                    f"{self._where}: the claim of node {node!r} is damaged ({exc})"
                ) from None
            holder = None
            if stored_inc is not None and b"released_at" not in meta:
                pid = meta.get(b"pid", b"?").decode(errors="replace")
                holder = (pid, meta.get(b"host", b"?").decode(errors="replace"))
            new_epoch = claim_epoch(self.url, node, epoch, stored_epoch, holder)
            inc, gen = (stored_inc or 0) + 1, stored_gen + 1
            if gen > MAX_GEN:
                raise StoreUnavailable(
                    f"{self._where}: node {node!r} used up its logical clock "
                    f"({MAX_GEN} claims and renewals); use a new node id"
                )
            ts = CLOCK.at(gen)
            mutations = [t.m.DeleteRangeFromColumn(META, b"released_at")]
            for q, v in (
                (b"inc", i64(inc)), (b"gen", i64(gen)), (b"epoch", i64(new_epoch)),
                (b"claimed_at", DOUBLE.pack(time.time())), (b"pid", str(os.getpid()).encode()),
                (b"host", socket.gethostname().encode()),
            ):  # fmt: skip
                mutations += t.replace(META, q, v, ts)
            what = f"claim node {node!r}"
            if stored_inc is None:  # a new node id: create its row's claim if still absent
                exists = t.f.ColumnRangeFilter(META, b"inc", b"inc")
                won = not t.mutate_if(key, exists, what, false=mutations)
            else:
                won = t.mutate_if(key, t.fence(stored_inc), what, true=mutations)
            return (new_epoch, inc, gen) if won else None

        new_epoch, inc, gen = claim_race(attempt, self._where, node)
        claim = Claim(new_epoch, inc, gen)
        claim.restored(self._read_node(node))
        self._claims.add(node, claim)
        return new_epoch

    def vouch(self, node: str, epoch: int, trusted: Callable[[], bool]) -> None:
        """Nothing to skip: the epoch is checked inside every write."""

    def release(self, node: str, epoch: int) -> None:
        claim, is_open = self._claims.release(node)
        if not is_open:
            return
        t = self._t
        if claim is not None and claim.epoch == epoch:
            predicate = t.fence(claim.incarnation)
        else:
            predicate = t.cell_is(META, b"epoch", i64(epoch))
        mutations = t.replace(META, b"released_at", DOUBLE.pack(time.time()), 0)
        t.mutate_if(node_key(node), predicate, f"release node {node!r}", true=mutations)

    def nodes(self) -> list[NodeRecord]:
        out = []
        for row in self._t.scan_nodes(self._t.newest(META), "list nodes"):
            meta = {c.qualifier: c.value for c in row.cells}
            if b"inc" not in meta:
                continue
            try:
                claimed = DOUBLE.unpack(meta[b"claimed_at"])[0] if b"claimed_at" in meta else None
                released = (
                    DOUBLE.unpack(meta[b"released_at"])[0] if b"released_at" in meta else None
                )
                record = NodeRecord(
                    row.row_key[len(NODE_PREFIX) :].decode(),
                    as_int(meta.get(b"epoch", i64(0))),
                    claimed,
                    released,
                )
            except (ValueError, struct.error) as exc:
                raise CorruptStore(f"{self._where}: a node's claim is damaged ({exc})") from None
            out.append(record)
        return sorted(out, key=lambda n: n.node)

    # -- reading -------------------------------------------------------------------

    def _read_node(self, node: str) -> Snapshot:
        row = self._t.read_row(
            node_key(node), self._t.newest(f"{FAMILY}|{VALUE}"), f"load node {node!r}"
        )
        return decode_node(self._where, node, [] if row is None else row.cells)

    def load(self, node: str) -> Snapshot:
        cached = self._claims.take_snapshot(node)
        if cached is not None:
            return cached
        return self._read_node(node)

    def load_created(self, node: str) -> dict[str, dict[str, float]]:
        row = self._t.read_row(
            node_key(node), self._t.newest(CREATED), f"load created times of {node!r}"
        )
        out: dict[str, dict[str, float]] = {}
        for c in [] if row is None else row.cells:
            try:
                name, labels = split_column(c.qualifier)
                out.setdefault(name, {})[labels] = DOUBLE.unpack(c.value)[0]
            except (ValueError, struct.error) as exc:
                raise CorruptStore(
                    f"{self._where}: a created time of node {node!r} is damaged ({exc})"
                ) from None
        return out

    def read_cluster(self, name: str | None = None) -> ClusterSnapshot:
        f = self._t.f
        if name is None:
            row_filter = self._t.newest(f"{FAMILY}|{VALUE}")
        else:
            n = name.encode()
            row_filter = f.RowFilterChain([
                f.RowFilterUnion([
                    f.ColumnRangeFilter(FAMILY, n, n),
                    f.ColumnRangeFilter(VALUE, n + SEP, n + b"\x01", inclusive_end=False),
                ]),
                f.CellsColumnLimitFilter(1),
            ])  # fmt: skip
        snap = ClusterSnapshot()
        for row in self._t.scan_nodes(row_filter, "read cluster totals"):
            node = row.row_key[len(NODE_PREFIX) :].decode()
            for c in row.cells:
                try:
                    if c.family == FAMILY:
                        fname = c.qualifier.decode()
                        snap.families.setdefault(node, {})[fname] = decode_family(fname, c.value)
                    else:
                        sname, labels = split_column(c.qualifier)
                        snap.rows.append((node, sname, labels, decode_value(c.value)))
                except (ValueError, KeyError, TypeError) as exc:
                    raise CorruptStore(
                        f"{self._where}: node {node!r} holds a damaged cell "
                        f"{c.family}:{c.qualifier!r} ({exc}); refusing it"
                    ) from None
        snap.rows.sort()
        return snap

    # -- writing -------------------------------------------------------------------

    def _fenced(self, node: str, claim: Claim) -> Fenced:
        """Forget ``claim``: a newer incarnation took the node over."""
        return self._claims.fenced(node, claim, _fenced_message(node, claim))

    def _timestamp(self, node: str, claim: Claim) -> int:
        """The next cell timestamp of ``claim`` (its lock held); renews the
        generation when the sequence ran out."""
        if claim.exhausted(self.max_seq):
            gen = claim.generation + 1
            if gen > MAX_GEN:
                raise StoreUnavailable(
                    f"{self._where}: node {node!r} used up its logical clock; re-claim it"
                )
            t = self._t
            mutations = t.replace(META, b"gen", i64(gen), CLOCK.at(gen))
            if not t.mutate_if(
                node_key(node), t.fence(claim.incarnation), f"renew node {node!r}", true=mutations
            ):
                raise self._fenced(node, claim)
            claim.generation, claim.seq = gen, 0
        return claim.tick(CLOCK)

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
            claim.snapshot = None  # the claim's read is stale from now on
            size = len(families) + len(keys)
            size += sum(1 if (n, lk) in claim.known else 2 for n, lk, _, _ in series)
            if keys and size > self.mutations_per_request:
                busy = [k.key for k in keys]
                raise KeyConflict(
                    f"{self._where}: a flush of {size} mutations with idempotency keys is too "
                    "big for one atomic Bigtable mutation; its keyed increments are not "
                    "acknowledged (retry them)",
                    (),
                    busy,
                )
            ts = self._timestamp(node, claim)
            if keys:
                self._keys.own(node, claim, keys)
            self._write(node, claim, ts, families, series, keys)

    def _write(
        self,
        node: str,
        claim: Claim,
        ts: int,
        families: Sequence[FamilyDef],
        series: Sequence[SeriesRow],
        keys: Sequence[KeyRecord],
    ) -> None:
        set_cell = self._t.m.SetCell
        # Families first: a series never lands before its definition.
        chunk = [set_cell(FAMILY, f.name.encode(), encode_family(f), ts) for f in families]
        chunks = [chunk]
        fresh: list[list[tuple[str, str]]] = [[]]
        limit = self.mutations_per_request
        for name, labels, value, created in series:
            first = (name, labels) not in claim.known
            if len(chunk) + 1 + first > limit:
                chunk = []
                chunks.append(chunk)
                fresh.append([])
            column = cell_column(name, labels)
            chunk.append(set_cell(VALUE, column, encode_value(value), ts))
            if first:
                chunk.append(set_cell(CREATED, column, DOUBLE.pack(created), ts))
                fresh[-1].append((name, labels))
        for k in keys:  # only ever with one chunk (see write())
            doc = {"fingerprint": k.fingerprint, "result": k.result, "token": k.token,
                   "expires": k.expires}  # fmt: skip
            chunk.append(set_cell(KEY, k.key.encode(), to_json(doc), key_timestamp(k.expires)))
        if not any(chunks):  # nothing to write: still refuse a fenced handle
            current = self._t.read_meta(node).get(b"inc")
            stored = None if current is None else as_int(current)
            self._claims.check(node, claim, stored, _fenced_message(node, claim))
            return
        for part, new in zip(chunks, fresh, strict=True):
            if not part:
                continue
            if not self._t.mutate_if(
                node_key(node), self._t.fence(claim.incarnation), f"write node {node!r}", true=part
            ):
                raise self._fenced(node, claim)
            claim.known.update(new)

    def lookup_key(self, key: str) -> KeyRecord | None:
        return self._keys.lookup(key)

    def lookup_keys(self, keys: Sequence[str]) -> dict[str, KeyRecord | None]:
        return {key: self._keys.lookup(key) for key in keys}

    def expire_keys(self, now: float, limit: int = 1000) -> int:
        return 0

    def close(self) -> None:
        if self._claims.close():
            self._keys.close()
            close_clients(self._where, self._client, self._t.admin)

    def __repr__(self) -> str:
        return f"<BigtableStore {self.url}>"


def _fenced_message(node: str, claim: Claim) -> str:
    return (
        f"node {node!r}: a newer incarnation claimed it; this one "
        f"({claim.incarnation}) is fenced and its write refused"
    )
