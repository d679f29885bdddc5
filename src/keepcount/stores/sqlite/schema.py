"""The SQLite store's file format: its schema, the checks a file passes before
it is used, its creation (whole or not at all) and the upgrade of older
versions (1, 2 and 3) to ``FORMAT_VERSION`` 4.  Described in
``keepcount.stores.sqlite``; the row checksums of version 4 in ``checksums``
and the check of the WAL before SQLite recovers it in ``wal``.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import struct
import time
import uuid
from pathlib import Path

from keepcount.errors import CorruptStore, KeepcountError, StoreUnavailable
from keepcount.stores.sqlite.checksums import family_crc, key_crc, register, series_crc

__all__ = [
    "APPLICATION_ID",
    "FORMAT_VERSION",
    "check_header",
    "connect",
    "create",
    "translate",
]


APPLICATION_ID = 0x6B636E74  # "kcnt"
FORMAT_VERSION = 4
_UPGRADABLE = (1, 2, 3)  # older versions this one upgrades in place

_KIND_CHECK = "CHECK (kind IN ('counter', 'histogram') OR kind GLOB 'prometheus.*')"
_FAMILIES = f"""
CREATE TABLE {{table}}(
    node TEXT NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL {_KIND_CHECK},
    help TEXT NOT NULL,
    labelnames TEXT NOT NULL,
    buckets TEXT NOT NULL,
    crc INTEGER NOT NULL,
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
    expires REAL NOT NULL,
    crc INTEGER NOT NULL
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
    crc INTEGER NOT NULL,
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
INSERT INTO families_v3(node, name, kind, help, labelnames, buckets, crc)
    SELECT node, name, kind, help, labelnames, buckets, 0 FROM families;
DROP TABLE families;
ALTER TABLE families_v3 RENAME TO families;
"""
)
_TABLES = {
    "meta": ["key", "value"],
    "nodes": ["node", "epoch", "claimed_at", "released_at", "pid", "host"],
    "families": ["node", "name", "kind", "help", "labelnames", "buckets", "crc"],
    "series": ["node", "name", "labels", "value", "created", "crc"],
    "idempotency": ["key", "node", "fingerprint", "result", "token", "expires", "crc"],
}
_CHECKSUMMED = ("families", "series", "idempotency")  # their last column is crc since version 4

# Primary result codes (sqlite3.h) used to classify driver errors.
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_IOERR, _SQLITE_CORRUPT = 5, 6, 10, 11
_SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_NOTADB = 13, 14, 26
_HEADER = b"SQLite format 3\x00"


def create(path: Path) -> None:
    """Create a new store file at ``path``: built under a temporary name,
    fsynced, hard-linked into place (never over a file another process just
    made), the temporary name removed, the directory fsynced: durable once
    it returns (``tests/system/test_power_loss.py`` cuts the power right
    after).  ``StoreUnavailable`` if it cannot."""
    tmp = path.with_name(f".{path.name}.init-{uuid.uuid4().hex[:12]}")
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
            os.link(tmp, path)  # never replaces a file another process just made
        except FileExistsError:
            pass
        # The temporary name goes before the directory fsync, which makes the
        # link and the unlink durable together: a power cut right after
        # create() returns leaves the file, and no stray temporary copy.
        os.unlink(tmp)
        _fsync_dir(path.parent)
    except (OSError, sqlite3.Error) as exc:
        raise StoreUnavailable(f"cannot create store {path}: {exc}") from exc
    finally:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{tmp}{suffix}")


def check_header(path: Path) -> None:
    """Refuse files that are not whole keepcount stores, before SQLite sees them."""
    where = f"store {path}"
    try:
        with open(path, "rb") as f:
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
    _check_identity(path, app_id, user_version)
    # A checkpoint copies the WAL's pages into this file, page 1 (with the
    # new page count) first: a crash in the middle leaves the file shorter
    # than its header says, and the WAL, still whole, makes it right on
    # the next open.  Only a file with no WAL to replay is truncated.
    if change == valid_for and pages * page_size > size and not _has_wal(path):
        raise CorruptStore(
            f"{where} is truncated: its header counts {pages} pages of {page_size} bytes "
            f"({pages * page_size} bytes) but the file holds {size} bytes"
        )


def _has_wal(path: Path) -> bool:
    try:
        return os.path.getsize(f"{path}-wal") > 0
    except OSError:
        return False


def _check_identity(path: Path, app_id: int, user_version: int) -> None:
    where = f"store {path}"
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


def connect(path: Path, busy_timeout: float) -> sqlite3.Connection:
    """A connection to the store file at ``path`` once it passed every check
    (identity, ``quick_check``, schema, format metadata), in WAL mode with
    ``synchronous=FULL``, upgraded to ``FORMAT_VERSION`` if older;
    ``CorruptStore`` or ``StoreUnavailable`` otherwise."""
    where = f"store {path}"
    try:
        conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=busy_timeout
        )
    except sqlite3.Error as exc:
        raise translate(exc, f"cannot open {where}") from exc
    register(conn)
    try:
        # Again through SQLite: the header above may predate changes still in the WAL.
        _check_identity(
            path,
            conn.execute("PRAGMA application_id").fetchone()[0],
            conn.execute("PRAGMA user_version").fetchone()[0],
        )
        problems = [r[0] for r in conn.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            raise CorruptStore(f"{where} is corrupt: {'; '.join(problems)}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        expected = _expected_tables(version)
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
        raise translate(exc, f"cannot open {where}") from exc
    return conn


def _expected_tables(version: int) -> dict[str, list[str]]:
    """Table -> columns of a file of format ``version``."""
    tables = {t: c for t, c in _TABLES.items() if version > 1 or t != "idempotency"}
    if version < 4:
        tables = {t: c[:-1] if t in _CHECKSUMMED else c for t, c in tables.items()}
    return tables


def translate(exc: sqlite3.Error, context: str) -> KeepcountError:
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    name = getattr(exc, "sqlite_errorname", type(exc).__name__)
    if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return CorruptStore(f"{context}: the file is corrupt ({name}: {exc})")
    if code == _SQLITE_FULL:
        return StoreUnavailable(f"{context}: disk or file-size limit full ({name}: {exc})")
    return StoreUnavailable(f"{context} ({name}: {exc})")


def _upgrade(conn: sqlite3.Connection) -> None:
    """Bring a version 1, 2 or 3 file to this version, in one transaction.

    Version 4 adds the ``crc`` columns: added with a default of 0, then
    every row's checksum computed.  Rows damaged before the upgrade get a
    checksum of their damage; the claim's checks (``FIND_DAMAGE``) still
    see the damage keepcount can recognise."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version in _UPGRADABLE:  # not upgraded meanwhile
            add_crc = "ALTER TABLE {} ADD COLUMN crc INTEGER NOT NULL DEFAULT 0;"
            steps = (
                (_IDEMPOTENCY if version < 2 else add_crc.format("idempotency"))
                + (_REBUILD_FAMILIES if version < 3 else add_crc.format("families"))
                + add_crc.format("series")
            )
            for stmt in steps.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            _fill_checksums(conn)
            conn.execute(
                "UPDATE meta SET value = ? WHERE key = 'format_version'", (str(FORMAT_VERSION),)
            )
            conn.execute(f"PRAGMA user_version={FORMAT_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _fill_checksums(conn: sqlite3.Connection) -> None:
    """Compute the ``crc`` of every row (the upgrade to version 4)."""
    conn.executemany(
        "UPDATE series SET crc = ? WHERE node = ? AND name = ? AND labels = ?",
        [
            (series_crc(node, name, labels, value), node, name, labels)
            for node, name, labels, value in conn.execute(
                "SELECT node, name, labels, value FROM series"
            ).fetchall()
        ],
    )
    conn.executemany(
        "UPDATE families SET crc = ? WHERE node = ? AND name = ?",
        [
            (family_crc(node, name, kind, labelnames, buckets), node, name)
            for node, name, kind, labelnames, buckets in conn.execute(
                "SELECT node, name, kind, labelnames, buckets FROM families"
            ).fetchall()
        ],
    )
    conn.executemany(
        "UPDATE idempotency SET crc = ? WHERE key = ?",
        [
            (key_crc(*row), row[0])
            for row in conn.execute(
                "SELECT key, node, fingerprint, result, token, expires FROM idempotency"
            ).fetchall()
        ],
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
