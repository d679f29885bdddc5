"""``SQLiteStore``: claims, reads and writes of the embedded store.

The file format and its guarantees are described in ``keepcount.stores.sqlite``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from operator import itemgetter
from pathlib import Path

from keepcount.errors import (
    ClaimConflict,
    CorruptStore,
    InvalidInput,
    KeyConflict,
    StoreUnavailable,
)
from keepcount.naming import check_node_id
from keepcount.stores.base import (
    ClusterSnapshot,
    FamilyDef,
    KeyRecord,
    NodeRecord,
    SeriesRow,
    Snapshot,
    check_kind,
    next_epoch,
)
from keepcount.stores.sqlite.checksums import (
    CHECKED_VALUE,
    check_family,
    check_key,
    checked_value_of,
    family_seed,
    key_crc,
    refuse_series,
)
from keepcount.stores.sqlite.locks import WriterTurn, lock_node
from keepcount.stores.sqlite.schema import check_header, connect, create, translate
from keepcount.stores.sqlite.statements import (
    FIND_DAMAGE,
    KEYS_PER_STATEMENT,
    SERIES_PER_STATEMENT,
    UPSERT_FAMILY,
    check_epoch,
    chunks,
    family_def,
    family_row,
    insert_keys,
    live_keys,
    series_params,
    upsert_series,
    upsert_series_fenced,
)
from keepcount.stores.sqlite.wal import check_wal

__all__ = ["DEFAULT_BUSY_TIMEOUT", "SQLiteStore"]


DEFAULT_BUSY_TIMEOUT = 5.0
"""Seconds a write waits for another process's write lock on the same file
before failing with ``StoreUnavailable``.  Flushes of other node ids on the
same file take milliseconds; five seconds only runs out when something is
wrong (a stuck process holding a transaction)."""


class SQLiteStore:
    """The embedded store (``sqlite:///rel.db``, ``sqlite:////abs/path.db``).

    Thread-safe: one connection, used under a lock.  Several processes may
    open the same file; each node id has at most one live claim.
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT):
        self.path = Path(path)
        self.url = f"sqlite:///{self.path}"
        self._lock = threading.Lock()
        # node -> descriptor holding its flock (None: claimed with a coordinator's epoch)
        self._claims: dict[str, int | None] = {}
        self._writers = WriterTurn(self.path)
        self._readers: set[sqlite3.Connection] = set()  # load_created's, interrupted by close()
        self._closed = False
        if not self.path.parent.is_dir():
            raise InvalidInput(
                f"cannot open store {self.path}: directory {self.path.parent} does not exist"
            )
        if not self.path.exists():
            create(self.path)
        check_header(self.path)
        check_wal(self.path, f"store {self.path}")
        self._conn = connect(self.path, busy_timeout)

    # -- the Store protocol --------------------------------------------------

    def claim(self, node: str, epoch: int | None = None) -> int:
        check_node_id(node)
        with self._lock:
            self._check_open()
            if node in self._claims:
                raise ClaimConflict(f"node {node!r} is already claimed through this handle")
            # With an epoch from a coordinator, the coordinator keeps one
            # holder per id and the epoch fences the rest; a lock would only
            # stop a new incarnation while a paused old one (a zombie the
            # coordinator already gave up on) still holds it.
            fd = lock_node(self.path, node) if epoch is None else None
            try:
                with self._txn(f"claim node {node!r}") as c:
                    damage = c.execute(FIND_DAMAGE, (node,)).fetchone()
                    if damage is not None:
                        name, labels, vtype, kind = damage
                        what = f"a {kind}" if kind else "a series without a family definition"
                        raise CorruptStore(
                            f"store {self.path}: node {node!r} holds {what} {name}{labels} "
                            f"with a value of type {vtype} that keepcount cannot have written; "
                            "refusing it"
                        )
                    row = c.execute("SELECT epoch FROM nodes WHERE node = ?", (node,)).fetchone()
                    epoch = next_epoch(node, epoch, row[0] if row else 0)
                    c.execute(
                        "INSERT INTO nodes(node, epoch, claimed_at, released_at, pid, host) "
                        "VALUES (?, ?, ?, NULL, ?, ?) ON CONFLICT(node) DO UPDATE SET "
                        "epoch = excluded.epoch, claimed_at = excluded.claimed_at, "
                        "released_at = NULL, pid = excluded.pid, host = excluded.host",
                        (node, epoch, time.time(), os.getpid(), socket.gethostname()),
                    )
            except BaseException:
                if fd is not None:
                    os.close(fd)
                raise
            self._claims[node] = fd
            return epoch

    def load(self, node: str) -> Snapshot:
        snap = Snapshot()
        path = self.path
        with self._lock, self._txn(f"load node {node!r}", write=False) as c:
            for name, kind, help_, labelnames, buckets, crc in c.execute(
                "SELECT name, kind, help, labelnames, buckets, crc FROM families WHERE node = ?",
                (node,),
            ):
                snap.families[name] = family_def(path, name, kind, help_, labelnames, buckets)
                check_family(path, node, name, kind, labelnames, buckets, crc)
            query = (
                f"SELECT labels, {checked_value_of('?3')} FROM series "  # noqa: S608 - a constant
                "WHERE node = ?1 AND name = ?2"
            )
            for name, family in snap.families.items():
                args = (node, name, family_seed(node, name))
                values = snap.values[name] = dict(c.execute(query, args))
                if None in values.values():  # a checksum failed
                    labels = next(k for k, v in values.items() if v is None)
                    raise refuse_series(c, path, node, name, labels, family)
        return snap

    def load_created(self, node: str) -> dict[str, dict[str, float]]:
        # A connection of its own (WAL: readers never block the writer), so
        # the flusher's writes go on while a million rows are read.
        where = f"store {self.path}: load the created times of node {node!r}"
        with self._lock:
            self._check_open()
            try:
                conn = sqlite3.connect(
                    f"{Path(os.path.abspath(self.path)).as_uri()}?mode=ro",
                    uri=True,
                    check_same_thread=False,
                )
            except sqlite3.Error as exc:
                raise translate(exc, where) from exc
            self._readers.add(conn)
        out: dict[str, dict[str, float]] = {}
        try:
            conn.execute("BEGIN")
            names = [
                n for (n,) in conn.execute("SELECT name FROM families WHERE node = ?", (node,))
            ]
            for name in names:
                out[name] = dict(
                    conn.execute(
                        "SELECT labels, created FROM series WHERE node = ? AND name = ?",
                        (node, name),
                    )
                )
        except sqlite3.Error as exc:
            raise translate(exc, where) from exc
        finally:
            with self._lock:
                self._readers.discard(conn)
            conn.close()
        return out

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
        with self._lock, self._writers.turn():
            if not families and not keys and 0 < len(series) <= SERIES_PER_STATEMENT:
                self._write_values(node, epoch, series)
            else:
                self._write_all(node, epoch, families, series, keys)

    def _write_values(self, node: str, epoch: int, series: Sequence[SeriesRow]) -> None:
        """The usual flush (values only) as one autocommit statement that checks
        the epoch itself: atomic and durable on its own, and one GIL release
        for the flusher thread instead of four (see ``SERIES_PER_STATEMENT``)."""
        self._check_open()
        values = series_params(node, series)
        values += (node, epoch)
        try:
            written = self._conn.execute(upsert_series_fenced(len(series)), values).rowcount
        except sqlite3.Error as exc:
            raise translate(exc, f"store {self.path}: write node {node!r} failed") from exc
        if written != len(series):  # the epoch did not match: nothing was written
            with self._txn(f"write node {node!r}") as c:
                check_epoch(c, node, epoch)
            raise StoreUnavailable(
                f"store {self.path}: write node {node!r} wrote {written} of {len(series)} rows"
            )

    def _write_all(
        self,
        node: str,
        epoch: int,
        families: Sequence[FamilyDef],
        series: Sequence[SeriesRow],
        keys: Sequence[KeyRecord],
    ) -> None:
        with self._txn(f"write node {node!r}") as c:
            check_epoch(c, node, epoch)
            if keys:
                # Keys first: a live one aborts the whole write (rolled back by
                # _txn).  No other writer runs inside BEGIN IMMEDIATE, so the
                # check and the insert cannot race.
                now = time.time()
                taken = []
                for chunk in chunks(keys, KEYS_PER_STATEMENT):
                    taken += [
                        key
                        for (key,) in c.execute(
                            live_keys(len(chunk)), (*(k.key for k in chunk), now)
                        )
                    ]
                if taken:
                    raise KeyConflict(
                        f"store {self.path}: idempotency keys already recorded: {taken}", taken
                    )
                for chunk in chunks(keys, KEYS_PER_STATEMENT):
                    params: list[object] = []
                    for k in chunk:
                        fields = (k.key, k.node, k.fingerprint, k.result, k.token, k.expires)
                        params += (*fields, key_crc(*fields))
                    params.append(now)
                    c.execute(insert_keys(len(chunk)), params)
            if families:
                c.executemany(UPSERT_FAMILY, [family_row(node, f) for f in families])
            for rows in chunks(series, SERIES_PER_STATEMENT):
                c.execute(upsert_series(len(rows)), series_params(node, rows))

    native_key_expiry = False

    def lookup_key(self, key: str) -> KeyRecord | None:
        return self.lookup_keys([key])[key]

    def lookup_keys(self, keys: Sequence[str]) -> dict[str, KeyRecord | None]:
        found: dict[str, KeyRecord | None] = dict.fromkeys(keys)
        with self._lock, self._txn("look up idempotency keys", write=False) as c:
            for start in range(0, len(found), 500):  # SQLite's bound-parameter limit
                chunk = list(found)[start : start + 500]
                marks = ",".join("?" * len(chunk))
                query = (  # only "?" placeholders are formatted in
                    "SELECT key, node, fingerprint, result, token, expires, crc "  # noqa: S608
                    f"FROM idempotency WHERE key IN ({marks}) AND expires > ?"
                )
                for row in c.execute(query, (*chunk, time.time())):
                    check_key(self.path, *row)
                    found[row[0]] = KeyRecord(*row[:-1])
        return found

    def expire_keys(self, now: float, limit: int = 1000) -> int:
        with self._lock, self._txn("expire idempotency keys") as c:
            return c.execute(
                "DELETE FROM idempotency WHERE key IN "
                "(SELECT key FROM idempotency WHERE expires <= ? LIMIT ?)",
                (now, limit),
            ).rowcount

    def read_cluster(self, name: str | None = None) -> ClusterSnapshot:
        snap = ClusterSnapshot()
        where, args = ("WHERE name = ?", (name,)) if name is not None else ("", ())
        path = self.path
        with self._lock, self._txn("read cluster totals", write=False) as c:
            for node, fname, kind, help_, labelnames, buckets, crc in c.execute(
                f"SELECT node, name, kind, help, labelnames, buckets, crc FROM families {where}",  # noqa: S608
                args,
            ):
                fam = family_def(path, fname, kind, help_, labelnames, buckets)
                check_family(path, node, fname, kind, labelnames, buckets, crc)
                snap.families.setdefault(node, {})[fname] = fam
            snap.rows = c.execute(
                f"SELECT node, name, labels, {CHECKED_VALUE} FROM series {where}",  # noqa: S608
                args,
            ).fetchall()
            if None in map(itemgetter(3), snap.rows):  # a checksum failed
                node, fname, labels, _ = next(r for r in snap.rows if r[3] is None)
                family = snap.families.get(node, {}).get(fname)
                raise refuse_series(c, path, node, fname, labels, family)
        return snap

    def nodes(self) -> list[NodeRecord]:
        with self._lock, self._txn("list nodes", write=False) as c:
            rows = c.execute(
                "SELECT node, epoch, claimed_at, released_at FROM nodes ORDER BY node"
            ).fetchall()
        return [NodeRecord(*r) for r in rows]

    def vouch(self, node: str, epoch: int, trusted: Callable[[], bool]) -> None:
        """Nothing to skip: the epoch is checked inside every write."""

    def release(self, node: str, epoch: int) -> None:
        with self._lock:
            held = self._claims.pop(node, None)
            try:
                if not self._closed:
                    with self._txn(f"release node {node!r}") as c:
                        c.execute(
                            "UPDATE nodes SET released_at = ? WHERE node = ? AND epoch = ?",
                            (time.time(), node, epoch),
                        )
            finally:
                if held is not None:
                    os.close(held)  # closing the descriptor drops the flock

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in self._claims.values():
                if fd is not None:
                    os.close(fd)
            self._claims.clear()
            for reader in self._readers:
                reader.interrupt()  # its thread closes it
            self._conn.close()
            self._writers.close()

    # -- helpers ---------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable(f"store {self.path} is closed")

    @contextlib.contextmanager
    def _txn(self, what: str, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction; driver errors become keepcount errors naming the file."""
        self._check_open()
        c = self._conn
        try:
            c.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield c
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        c.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise translate(exc, f"store {self.path}: {what} failed") from exc

    def __repr__(self) -> str:
        return f"<SQLiteStore {self.path}>"
