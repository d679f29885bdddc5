"""The embedded store: one SQLite file, shared by any number of node ids on one host.

File format (``FORMAT_VERSION`` 3)
----------------------------------
An SQLite 3 database in WAL mode, identified by ``PRAGMA application_id =
0x6B636E74`` ("kcnt") and ``PRAGMA user_version = 3``, with these tables
(all ``STRICT``; all but ``meta`` and ``nodes`` ``WITHOUT ROWID``)::

    meta(key PRIMARY KEY, value)          format = keepcount, format_version = 3
    nodes(node PRIMARY KEY, epoch, claimed_at, released_at, pid, host)
    families(node, name, kind, help, labelnames, buckets)   PRIMARY KEY (node, name)
    series(node, name, labels, value, created)              PRIMARY KEY (node, name, labels)
    idempotency(key PRIMARY KEY, node, fingerprint, result, token, expires)

``kind`` is ``counter``, ``histogram`` or a prometheus kind (``CHECK (kind IN
('counter', 'histogram') OR kind GLOB 'prometheus.*')``; ``stores.base``
says which prometheus kinds are valid); ``labels`` is the JSON array of label
values (``metrics.label_key``); ``buckets`` the JSON array of a histogram's
(or a ``prometheus.histogram``'s) finite upper bounds (+Inf implied), ``[]``
for other kinds; ``value`` is an INTEGER for a counter, the histogram
encoding (TEXT) for a histogram and the writer's JSON text, kept as it is,
for a prometheus kind; each row holds the node's *absolute* value, upserted
by flushes.

Older versions are upgraded in place on open, in one transaction, once the
file has passed every check below: version 1 lacks the ``idempotency`` table;
versions 1 and 2 allow only ``counter`` and ``histogram`` in
``families.kind``, and since SQLite cannot alter a ``CHECK`` the upgrade
rebuilds ``families`` (a new table, the rows copied, the old one dropped,
the new one renamed).  The upgrade is one way: an older keepcount refuses a
version-3 file (``CorruptStore``, format version).

Durability and safety
---------------------
- Every write is one ``BEGIN IMMEDIATE`` transaction committed with
  ``synchronous=FULL``: the WAL is fsynced before ``write()`` returns.
- The file is created whole or not at all: it is built under a temporary
  name, fsynced, hard-linked into place (never over an existing file) and its
  directory fsynced.  So an empty or headerless file at the path was never a
  keepcount store, and it is refused rather than reinitialised.
- On open the header, ``application_id``, ``user_version``, schema and
  ``PRAGMA quick_check`` are verified; any mismatch raises ``CorruptStore``
  naming the file.  SQLite errors later on are translated: corruption ->
  ``CorruptStore``; busy, full, I/O -> ``StoreUnavailable`` (nothing written).
- A claim first checks every row of the node (types, definitions, histogram
  shapes, a prometheus kind's value being valid JSON text) and refuses a
  damaged node before it writes anything.
- A claim is an exclusive ``flock`` on ``<file>-locks/<node>.lock`` held for
  the claim's lifetime (the kernel drops it when the process dies, even on
  SIGKILL), plus an epoch in ``nodes`` that only grows.  Each write checks the
  epoch inside its transaction, so a stale handle can never overwrite a newer
  incarnation's values.  A claim with an epoch from a coordinator takes no
  lock: the coordinator keeps one holder per id, and the epoch fences a
  paused old incarnation that still runs.

Example::

    >>> store = SQLiteStore("/tmp/counters.db")            # doctest: +SKIP
    >>> epoch = store.claim("node-1")                      # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import math
import os
import socket
import sqlite3
import struct
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from keepcount.errors import (
    ClaimConflict,
    CorruptStore,
    Fenced,
    InvalidInput,
    KeepcountError,
    KeyConflict,
    StoreUnavailable,
)
from keepcount.naming import check_node_id
from keepcount.slots import try_lock
from keepcount.stores.base import (
    ClusterSnapshot,
    FamilyDef,
    KeyRecord,
    NodeRecord,
    SeriesRow,
    Snapshot,
    check_kind,
    has_buckets,
)

__all__ = ["APPLICATION_ID", "FORMAT_VERSION", "SQLiteStore"]

APPLICATION_ID = 0x6B636E74  # "kcnt"
FORMAT_VERSION = 3
_UPGRADABLE = (1, 2)  # older versions this one upgrades in place

DEFAULT_BUSY_TIMEOUT = 5.0
"""Seconds a write waits for another process's write lock on the same file
before failing with ``StoreUnavailable``.  Flushes of other node ids on the
same file take milliseconds; five seconds only runs out when something is
wrong (a stuck process holding a transaction)."""

_KIND_CHECK = "CHECK (kind IN ('counter', 'histogram') OR kind GLOB 'prometheus.*')"
_FAMILIES = f"""
CREATE TABLE {{table}}(
    node TEXT NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL {_KIND_CHECK},
    help TEXT NOT NULL,
    labelnames TEXT NOT NULL,
    buckets TEXT NOT NULL,
    PRIMARY KEY (node, name)
) STRICT, WITHOUT ROWID;
"""
_IDEMPOTENCY = """
CREATE TABLE idempotency(
    key TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    result TEXT NOT NULL,
    token TEXT NOT NULL,
    expires REAL NOT NULL
) STRICT, WITHOUT ROWID;
CREATE INDEX idempotency_expires ON idempotency(expires);
"""
_SCHEMA = (
    """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
CREATE TABLE nodes(
    node TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL CHECK (epoch > 0),
    claimed_at REAL,
    released_at REAL,
    pid INTEGER,
    host TEXT
) STRICT;
"""
    + _FAMILIES.format(table="families")
    + """
CREATE TABLE series(
    node TEXT NOT NULL,
    name TEXT NOT NULL,
    labels TEXT NOT NULL,
    value ANY NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (node, name, labels)
) STRICT, WITHOUT ROWID;
"""
    + _IDEMPOTENCY
)
# Version 2 -> 3: families allows prometheus kinds.  SQLite cannot alter a
# CHECK, so the table is built again under another name and renamed.
_REBUILD_FAMILIES = (
    _FAMILIES.format(table="families_v3")  # noqa: S608 - a constant name
    + """
INSERT INTO families_v3(node, name, kind, help, labelnames, buckets)
    SELECT node, name, kind, help, labelnames, buckets FROM families;
DROP TABLE families;
ALTER TABLE families_v3 RENAME TO families;
"""
)
_TABLES = {
    "meta": ["key", "value"],
    "nodes": ["node", "epoch", "claimed_at", "released_at", "pid", "host"],
    "families": ["node", "name", "kind", "help", "labelnames", "buckets"],
    "series": ["node", "name", "labels", "value", "created"],
    "idempotency": ["key", "node", "fingerprint", "result", "token", "expires"],
}

# The first of a node's rows this format cannot hold: a series without its
# family, a counter that is not a non-negative integer, a histogram that is not
# a JSON array of one count per bucket (the finite ones and +Inf) plus the sum,
# a prometheus kind's value that is not valid JSON text, a family of any other
# kind.  Run by claim() before it writes anything: a damaged node is refused
# with the file untouched.
_FIND_DAMAGE = """
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

_UPSERT_FAMILY = (
    "INSERT INTO families(node, name, kind, help, labelnames, buckets) VALUES (?,?,?,?,?,?) "
    "ON CONFLICT(node, name) DO UPDATE SET help = excluded.help"
)
_T = TypeVar("_T")

# Rows per multi-row statement.  One statement per flush rather than one
# per row: the sqlite3 module releases the GIL around every statement step,
# and each time the flusher thread takes it back from a busy event loop it
# may wait a whole switch interval.  5 or 6 parameters a row stays far under
# SQLite's 32,766 variables per statement.
_SERIES_PER_STATEMENT = 500
_KEYS_PER_STATEMENT = 500


@functools.lru_cache(maxsize=64)
def _upsert_series(rows: int) -> str:
    return (
        "INSERT INTO series(node, name, labels, value, created) VALUES "  # noqa: S608 - only ?s
        + ",".join(["(?,?,?,?,?)"] * rows)
        + " ON CONFLICT(node, name, labels) DO UPDATE SET value = excluded.value"
    )


@functools.lru_cache(maxsize=64)
def _upsert_series_fenced(rows: int) -> str:
    # INSERT ... SELECT with ON CONFLICT needs a WHERE (SQLite's parsing
    # ambiguity); this one is the epoch check.
    return (
        "INSERT INTO series(node, name, labels, value, created) "  # noqa: S608 - only ?s
        "SELECT * FROM (VALUES " + ",".join(["(?,?,?,?,?)"] * rows) + ") "
        "WHERE (SELECT epoch FROM nodes WHERE node = ?) = ? "
        "ON CONFLICT(node, name, labels) DO UPDATE SET value = excluded.value"
    )


def _check_epoch(c: sqlite3.Connection, node: str, epoch: int) -> None:
    row = c.execute("SELECT epoch FROM nodes WHERE node = ?", (node,)).fetchone()
    if row is None or row[0] != epoch:
        raise Fenced(
            f"node {node!r}: epoch {epoch} was superseded by epoch "
            f"{row[0] if row else None}; write refused"
        )


@functools.lru_cache(maxsize=64)
def _live_keys(keys: int) -> str:
    marks = ",".join("?" * keys)
    return f"SELECT key FROM idempotency WHERE key IN ({marks}) AND expires > ?"  # noqa: S608


@functools.lru_cache(maxsize=64)
def _insert_keys(keys: int) -> str:
    # Replaces an expired record (the last parameter is now); live ones were
    # refused before it runs.
    return (
        "INSERT INTO idempotency(key, node, fingerprint, result, token, expires) VALUES "  # noqa: S608
        + ",".join(["(?,?,?,?,?,?)"] * keys)
        + " ON CONFLICT(key) DO UPDATE SET node = excluded.node, "
        "fingerprint = excluded.fingerprint, result = excluded.result, token = excluded.token, "
        "expires = excluded.expires WHERE idempotency.expires <= ?"
    )


def _chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# Primary result codes (sqlite3.h) used to classify driver errors.
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_IOERR, _SQLITE_CORRUPT = 5, 6, 10, 11
_SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_NOTADB = 13, 14, 26
_HEADER = b"SQLite format 3\x00"


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
        self._turn_fd: int | None = None  # see _turn()
        self._readers: set[sqlite3.Connection] = set()  # load_created's, interrupted by close()
        self._closed = False
        if not self.path.parent.is_dir():
            raise InvalidInput(
                f"cannot open store {self.path}: directory {self.path.parent} does not exist"
            )
        if not self.path.exists():
            self._create()
        self._check_header()
        self._conn = self._connect(busy_timeout)

    # -- opening -------------------------------------------------------------

    def _create(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.init-{uuid.uuid4().hex[:12]}")
        try:
            conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                conn.execute("BEGIN")
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                conn.executemany(
                    "INSERT INTO meta(key, value) VALUES (?, ?)",
                    [
                        ("format", "keepcount"),
                        ("format_version", str(FORMAT_VERSION)),
                        ("created_at", repr(time.time())),
                    ],
                )
                conn.execute(f"PRAGMA user_version={FORMAT_VERSION}")
                conn.execute("COMMIT")
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            try:
                os.link(tmp, self.path)  # never replaces a file another process just made
            except FileExistsError:
                pass
            _fsync_dir(self.path.parent)
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(f"cannot create store {self.path}: {exc}") from exc
        finally:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{tmp}{suffix}")

    def _check_header(self) -> None:
        """Refuse files that are not whole keepcount stores, before SQLite sees them."""
        where = f"store {self.path}"
        try:
            with open(self.path, "rb") as f:
                head = f.read(100)
                size = os.fstat(f.fileno()).st_size
        except OSError as exc:
            raise StoreUnavailable(f"cannot read {where}: {exc}") from exc
        if size == 0:
            raise CorruptStore(
                f"{where} is an empty file: truncated, or not made by keepcount "
                "(keepcount creates its files whole); refusing to start from zero"
            )
        if len(head) < 100 or not head.startswith(_HEADER):
            raise CorruptStore(f"{where} is not an SQLite database (foreign or corrupt file)")
        (page_size,) = struct.unpack(">H", head[16:18])
        page_size = 65536 if page_size == 1 else page_size
        (change,) = struct.unpack(">I", head[24:28])
        (pages,) = struct.unpack(">I", head[28:32])
        (valid_for,) = struct.unpack(">I", head[92:96])
        (user_version,) = struct.unpack(">i", head[60:64])
        (app_id,) = struct.unpack(">i", head[68:72])
        self._check_identity(app_id, user_version)
        # A checkpoint copies the WAL's pages into this file, page 1 (with the
        # new page count) first: a crash in the middle leaves the file shorter
        # than its header says, and the WAL, still whole, makes it right on
        # the next open.  Only a file with no WAL to replay is truncated.
        if change == valid_for and pages * page_size > size and not self._has_wal():
            raise CorruptStore(
                f"{where} is truncated: its header counts {pages} pages of {page_size} bytes "
                f"({pages * page_size} bytes) but the file holds {size} bytes"
            )

    def _has_wal(self) -> bool:
        try:
            return os.path.getsize(f"{self.path}-wal") > 0
        except OSError:
            return False

    def _check_identity(self, app_id: int, user_version: int) -> None:
        where = f"store {self.path}"
        if app_id != APPLICATION_ID:
            raise CorruptStore(
                f"{where} is an SQLite database but not a keepcount store "
                f"(application_id {app_id:#x}, expected {APPLICATION_ID:#x})"
            )
        if user_version != FORMAT_VERSION and user_version not in _UPGRADABLE:
            newer = " (upgrade keepcount)" if user_version > FORMAT_VERSION else ""
            raise CorruptStore(
                f"{where} has format version {user_version}; this keepcount reads version "
                f"{FORMAT_VERSION}{newer}"
            )

    def _connect(self, busy_timeout: float) -> sqlite3.Connection:
        where = f"store {self.path}"
        try:
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=busy_timeout
            )
        except sqlite3.Error as exc:
            raise _translate(exc, f"cannot open {where}") from exc
        try:
            # Again through SQLite: the header above may predate changes still in the WAL.
            self._check_identity(
                conn.execute("PRAGMA application_id").fetchone()[0],
                conn.execute("PRAGMA user_version").fetchone()[0],
            )
            problems = [r[0] for r in conn.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                raise CorruptStore(f"{where} is corrupt: {'; '.join(problems)}")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            expected = {t: c for t, c in _TABLES.items() if version > 1 or t != "idempotency"}
            tables = {t: [r[1] for r in conn.execute(f"PRAGMA table_info({t})")] for t in _TABLES}
            tables = {t: c for t, c in tables.items() if c or t in expected}
            if tables != expected:
                raise CorruptStore(f"{where} does not have keepcount's schema: {tables}")
            if version >= 3:
                (families,) = conn.execute(
                    "SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = 'families'"
                ).fetchone()
                if _KIND_CHECK not in families:
                    raise CorruptStore(
                        f"{where} does not have keepcount's schema: its families table "
                        f"is not that of format version {version}: {families}"
                    )
            meta = dict(conn.execute("SELECT key, value FROM meta"))
            if meta.get("format") != "keepcount" or meta.get("format_version") != str(version):
                raise CorruptStore(f"{where} has unexpected format metadata {meta}")
            # Only now that the file is known to be ours may anything be changed.
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise StoreUnavailable(f"{where}: cannot use WAL journal mode (got {mode!r})")
            conn.execute("PRAGMA synchronous=FULL")
            if version != FORMAT_VERSION:
                _upgrade(conn)
        except KeepcountError:
            conn.close()
            raise
        except sqlite3.Error as exc:
            conn.close()
            raise _translate(exc, f"cannot open {where}") from exc
        return conn

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
            fd = self._lock_node(node) if epoch is None else None
            try:
                with self._txn(f"claim node {node!r}") as c:
                    damage = c.execute(_FIND_DAMAGE, (node,)).fetchone()
                    if damage is not None:
                        name, labels, vtype, kind = damage
                        what = f"a {kind}" if kind else "a series without a family definition"
                        raise CorruptStore(
                            f"store {self.path}: node {node!r} holds {what} {name}{labels} "
                            f"with a value of type {vtype} that keepcount cannot have written; "
                            "refusing it"
                        )
                    row = c.execute("SELECT epoch FROM nodes WHERE node = ?", (node,)).fetchone()
                    stored = row[0] if row else 0
                    if epoch is None:
                        epoch = stored + 1
                    elif epoch < stored:
                        raise Fenced(
                            f"node {node!r}: epoch {epoch} is older than the stored epoch {stored}"
                        )
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

    def _lock_node(self, node: str) -> int:
        lockdir = self.path.with_name(self.path.name + "-locks")
        path = lockdir / f"{node}.lock"  # the same file as slot 0 of a host (keepcount.slots)
        try:
            lockdir.mkdir(exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot make lock directory {lockdir}: {exc}") from exc
        fd = try_lock(path)
        if isinstance(fd, str):
            raise ClaimConflict(
                f"node {node!r} is already claimed on {self.path} by {fd} (lock {path})"
            )
        return fd

    def load(self, node: str) -> Snapshot:
        snap = Snapshot()
        with self._lock, self._txn(f"load node {node!r}", write=False) as c:
            for name, kind, help_, labelnames, buckets in c.execute(
                "SELECT name, kind, help, labelnames, buckets FROM families WHERE node = ?", (node,)
            ):
                snap.families[name] = _family(self.path, name, kind, help_, labelnames, buckets)
            for name in snap.families:
                args = (node, name)
                snap.values[name] = dict(
                    c.execute("SELECT labels, value FROM series WHERE node = ? AND name = ?", args)
                )
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
                raise _translate(exc, where) from exc
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
            raise _translate(exc, where) from exc
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
        with self._lock, self._turn():
            if not families and not keys and 0 < len(series) <= _SERIES_PER_STATEMENT:
                self._write_values(node, epoch, series)
            else:
                self._write_all(node, epoch, families, series, keys)

    def _write_values(self, node: str, epoch: int, series: Sequence[SeriesRow]) -> None:
        """The usual flush (values only) as one autocommit statement that checks
        the epoch itself: atomic and durable on its own, and one GIL release
        for the flusher thread instead of four (see ``_SERIES_PER_STATEMENT``)."""
        self._check_open()
        values: list[object] = []
        for row in series:
            values.append(node)
            values += row
        values += (node, epoch)
        try:
            written = self._conn.execute(_upsert_series_fenced(len(series)), values).rowcount
        except sqlite3.Error as exc:
            raise _translate(exc, f"store {self.path}: write node {node!r} failed") from exc
        if written != len(series):  # the epoch did not match: nothing was written
            with self._txn(f"write node {node!r}") as c:
                _check_epoch(c, node, epoch)
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
            _check_epoch(c, node, epoch)
            if keys:
                # Keys first: a live one aborts the whole write (rolled back by
                # _txn).  No other writer runs inside BEGIN IMMEDIATE, so the
                # check and the insert cannot race.
                now = time.time()
                taken = []
                for chunk in _chunks(keys, _KEYS_PER_STATEMENT):
                    taken += [
                        key
                        for (key,) in c.execute(
                            _live_keys(len(chunk)), (*(k.key for k in chunk), now)
                        )
                    ]
                if taken:
                    raise KeyConflict(
                        f"store {self.path}: idempotency keys already recorded: {taken}", taken
                    )
                for chunk in _chunks(keys, _KEYS_PER_STATEMENT):
                    params: list[object] = []
                    for k in chunk:
                        params += (k.key, k.node, k.fingerprint, k.result, k.token, k.expires)
                    params.append(now)
                    c.execute(_insert_keys(len(chunk)), params)
            if families:
                c.executemany(_UPSERT_FAMILY, [_family_row(node, f) for f in families])
            for rows in _chunks(series, _SERIES_PER_STATEMENT):
                values: list[object] = []
                for row in rows:
                    values.append(node)
                    values += row
                c.execute(_upsert_series(len(rows)), values)

    native_key_expiry = False

    def lookup_key(self, key: str) -> KeyRecord | None:
        with self._lock, self._txn("look up an idempotency key", write=False) as c:
            row = c.execute(
                "SELECT key, node, fingerprint, result, token, expires FROM idempotency "
                "WHERE key = ? AND expires > ?",
                (key, time.time()),
            ).fetchone()
        return None if row is None else KeyRecord(*row)

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
        with self._lock, self._txn("read cluster totals", write=False) as c:
            for node, fname, kind, help_, labelnames, buckets in c.execute(
                f"SELECT node, name, kind, help, labelnames, buckets FROM families {where}",  # noqa: S608
                args,
            ):
                fam = _family(self.path, fname, kind, help_, labelnames, buckets)
                snap.families.setdefault(node, {})[fname] = fam
            snap.rows = c.execute(
                f"SELECT node, name, labels, value FROM series {where}",  # noqa: S608
                args,
            ).fetchall()
        return snap

    def nodes(self) -> list[NodeRecord]:
        with self._lock, self._txn("list nodes", write=False) as c:
            rows = c.execute(
                "SELECT node, epoch, claimed_at, released_at FROM nodes ORDER BY node"
            ).fetchall()
        return [NodeRecord(*r) for r in rows]

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
            if self._turn_fd is not None:
                os.close(self._turn_fd)
                self._turn_fd = None

    # -- helpers ---------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable(f"store {self.path} is closed")

    @contextlib.contextmanager
    def _turn(self) -> Iterator[None]:
        """Wait for this host's turn to write (lock held), without polling.

        Writers of one file queue on SQLite's write lock, whose busy handler
        *sleeps* (1, 2, 5, 10 ms ...) between tries: with several worker
        processes committing at once, most of a commit's time went to those
        sleeps.  A blocking ``flock`` on ``<file>-locks/.writer.lock`` (no
        node id starts with a dot) queues them in the kernel instead, which
        wakes the next writer the moment the previous one is done.  SQLite's
        own lock still decides; this only orders who asks for it.
        """
        fd = self._turn_fd
        if fd is None:
            lockdir = self.path.with_name(self.path.name + "-locks")
            try:
                lockdir.mkdir(exist_ok=True)
                fd = os.open(lockdir / ".writer.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError:
                yield  # a read-only directory: SQLite's busy handler alone orders writers
                return
            self._turn_fd = fd
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

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
            raise _translate(exc, f"store {self.path}: {what} failed") from exc

    def __repr__(self) -> str:
        return f"<SQLiteStore {self.path}>"


def _translate(exc: sqlite3.Error, context: str) -> KeepcountError:
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    name = getattr(exc, "sqlite_errorname", type(exc).__name__)
    if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return CorruptStore(f"{context}: the file is corrupt ({name}: {exc})")
    if code == _SQLITE_FULL:
        return StoreUnavailable(f"{context}: disk or file-size limit full ({name}: {exc})")
    return StoreUnavailable(f"{context} ({name}: {exc})")


def _upgrade(conn: sqlite3.Connection) -> None:
    """Bring a version-1 or version-2 file to this version, in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version in _UPGRADABLE:  # not upgraded meanwhile
            steps = (_IDEMPOTENCY if version < 2 else "") + _REBUILD_FAMILIES
            for stmt in steps.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            conn.execute(
                "UPDATE meta SET value = ? WHERE key = 'format_version'", (str(FORMAT_VERSION),)
            )
            conn.execute(f"PRAGMA user_version={FORMAT_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _family(
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


def _family_row(node: str, f: FamilyDef) -> tuple[Any, ...]:
    finite = [b for b in f.buckets if b != math.inf]  # +Inf is implied: strict JSON has no Infinity
    return (node, f.name, f.kind, f.help, json.dumps(f.labelnames), json.dumps(finite))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
