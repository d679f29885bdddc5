"""Flipped bits: damage one stored value on disk, as a failing disk would,
and put it back, as an operator restoring the file would.

SQLite (``flip_sqlite_value``): the store's rows are records whose fields
lie one after the other, so a series row reads ``node name labels value
created crc`` with no separators in the record body; an integer value is
stored big-endian in 1, 2, 3, 4, 6 or 8 bytes (0 and 1 take none).  The
flip changes the value's lowest bit (a counter off by one, the quietest
damage there is) in the copies SQLite reads (the latest WAL frame of its
page, and the main file), while other nodes go on writing the file (see
``_xor_current``: under the file's write lock and its checkpoint lock,
then a commit that leaves the file's contents as they were, so that no
writer puts its cached copy of the page back).  ``repair`` flips them back
the same way.

Cassandra (``flip_sstables``): one bit in the middle of a replica's
``Data.db`` files, which keepcount's tables keep compressed in chunks with
a CRC each (``stores.cassandra.session``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
import sqlite3
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from keepcount.process import apoll_until
from keepcount.stores.sqlite.wal import in_use

if TYPE_CHECKING:
    from keepcount.cluster.supervisor import Supervisor

__all__ = [
    "CorruptOutcome",
    "Flip",
    "corrupt_cassandra",
    "corrupt_sqlite",
    "flip_byte",
    "flip_sstables",
    "find_value",
    "flip_sqlite_value",
    "repair",
    "value_bytes",
]

_WIDTHS = (1, 2, 3, 4, 6, 8)  # SQLite's integer serial types 1-6


def value_bytes(value: int) -> bytes:
    """How an SQLite record stores the integer ``value`` (2 and above: 0 and
    1 have serial types of their own and no bytes at all)."""
    if value in (0, 1):
        raise ValueError("0 and 1 have no bytes in an SQLite record to flip")
    for width in _WIDTHS:
        if -(1 << (8 * width - 1)) <= value < 1 << (8 * width - 1):
            return value.to_bytes(width, "big", signed=True)
    raise ValueError(f"{value} does not fit in 64 bits")


def _pattern(node: str, name: str, labels: str, value: int) -> bytes:
    return (node + name + labels).encode() + value_bytes(value)


def find_value(data: bytes, node: str, name: str, labels: str, value: int) -> list[int]:
    """Offsets of the last byte of every stored copy of the series row's
    integer ``value`` in ``data`` (a store file or its WAL)."""
    pattern = _pattern(node, name, labels, value)
    found = []
    at = data.find(pattern)
    while at >= 0:
        found.append(at + len(pattern) - 1)
        at = data.find(pattern, at + 1)
    return found


@dataclass(frozen=True, slots=True)
class Flip:
    """One flipped copy of a series row's value."""

    node: str
    name: str
    labels: str
    value: int
    """The value before the flip; ``value ^ 1`` after it."""
    files: tuple[Path, ...]
    """The store file and its WAL."""
    copies: int
    """How many copies were flipped."""


def _files(db: Path) -> tuple[Path, ...]:
    return (db, Path(f"{db}-wal"))


def _latest_frames(wal: bytes) -> list[range]:
    """The byte ranges of the WAL frames that hold their page's latest
    version (of the WAL header's generation): the copies SQLite reads.  An
    older frame is left alone: flipping it would only break its checksum."""
    if len(wal) < 32:
        return []
    page_size = int.from_bytes(wal[8:12], "big")
    frame = 24 + page_size
    latest: dict[int, int] = {}
    for at in range(32, len(wal) - frame + 1, frame):
        if wal[at + 8 : at + 16] != wal[16:24]:  # another generation: past the end
            break
        latest[int.from_bytes(wal[at : at + 4], "big")] = at
    return [range(at, at + frame) for at in latest.values()]


def _xor_file(path: Path, node: str, name: str, labels: str, value: int) -> int:
    """Flip the lowest bit of the copies SQLite reads of the row holding
    ``value`` in ``path`` (a WAL: those in ``_latest_frames``)."""
    count = 0
    pattern = _pattern(node, name, labels, value)
    with contextlib.suppress(FileNotFoundError), open(path, "r+b") as f:
        data = f.read()
        found = find_value(data, node, name, labels, value)
        if path.name.endswith("-wal"):
            frames = _latest_frames(data)
            found = [at for at in found if any(at in r for r in frames)]
        for at in found:
            # Read again just before the write: a checkpoint may have
            # rewritten the page since the whole file was read.
            if os.pread(f.fileno(), len(pattern), at + 1 - len(pattern)) == pattern:
                os.pwrite(f.fileno(), bytes([pattern[-1] ^ 1]), at)
                count += 1
        if count:
            os.fsync(f.fileno())
    return count


def _reader(db: Path) -> contextlib.closing[sqlite3.Connection]:
    """A read-only connection of its own to ``db`` (no cached page), which
    checks none of keepcount's checksums."""
    uri = f"{Path(os.path.abspath(db)).as_uri()}?mode=ro"
    return contextlib.closing(sqlite3.connect(uri, uri=True))


def _read_value(db: Path, node: str, name: str, labels: str) -> object:
    """What SQLite returns for the row now."""
    with _reader(db) as conn:
        row = conn.execute(
            "SELECT value FROM series WHERE node = ? AND name = ? AND labels = ?",
            (node, name, labels),
        ).fetchone()
    return None if row is None else row[0]


_CKPT_LOCK = 120 + 1
"""The byte of ``-shm`` whose lock SQLite's checkpoints take (os_unix.c:
the WAL locks start at byte 120; the checkpoint lock is the second)."""


@contextlib.contextmanager
def _no_checkpoints(db: Path) -> Iterator[None]:
    """Hold SQLite's checkpoint lock on ``db`` (waiting for a running
    checkpoint to end): a checkpoint copies a WAL frame it read earlier into
    the main file, and would put a page back as it was before a flip (or a
    repair) once the WAL restarts.  An open-file-description lock, which
    other processes' POSIX locks conflict with; opened before and closed
    after this process's own connections, whose POSIX locks closing a
    descriptor of the same file would drop."""
    if not in_use(db):  # no other connection: no checkpoint can run
        yield
        return
    try:
        fd = os.open(f"{db}-shm", os.O_RDWR)
    except FileNotFoundError:
        yield
        return
    try:
        lock = struct.pack("hhqqixxxx", fcntl.F_WRLCK, os.SEEK_SET, _CKPT_LOCK, 1, 0)
        fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, lock)
        yield
    finally:
        os.close(fd)  # drops the lock


def _xor_current(db: Path, node: str, name: str, labels: str, value: int) -> int:
    """Turn the row's ``value`` as SQLite reads it into ``value ^ 1``, holding
    the file's write lock so that no writer appends a copy meanwhile; how
    many copies it flipped (0: none, nothing changed).

    The copies in the WAL and in the main file (a checkpoint may already
    have copied the page there, and the WAL is reset after it), each one
    checked again just before its byte is written, with checkpoints held
    off (``_no_checkpoints``).  A write that leaves
    the ``meta`` page as it was commits at the end: it changes the WAL
    index, so every connection drops its cached pages and reads the flipped
    copy, rather than writing its cached one back over it with its next
    change to the page (an UPDATE that changes nothing writes nothing)."""
    with _no_checkpoints(db):
        conn = sqlite3.connect(db, isolation_level=None, timeout=10.0)
        try:
            conn.execute("PRAGMA wal_autocheckpoint=0")  # this one's commit checkpoints nothing
            conn.execute("BEGIN IMMEDIATE")
            try:
                copies = _xor_file(Path(f"{db}-wal"), node, name, labels, value)
                copies += _xor_file(db, node, name, labels, value)
                # SQLite writes no frame for an UPDATE that changes nothing:
                # change the row and back, in one transaction.
                conn.execute("UPDATE meta SET value = value || '.' WHERE key = 'format'")
                conn.execute("UPDATE meta SET value = 'keepcount' WHERE key = 'format'")
            finally:
                conn.execute("COMMIT")
        finally:
            conn.close()
    return copies


def flip_sqlite_value(db: Path, node: str, name: str, labels: str, value: int) -> Flip:
    """Flip the lowest bit of the integer ``value`` of the series row (``node``,
    ``name``, ``labels``) in the copies of it that SQLite reads, in the store
    file ``db`` or its WAL, while other processes use it; ``ValueError`` if
    SQLite does not then read the flipped value (nothing is left changed)."""
    copies = _xor_current(db, node, name, labels, value)
    if _read_value(db, node, name, labels) != value ^ 1:
        _xor_current(db, node, name, labels, value ^ 1)
        raise ValueError(f"no copy of {node} {name}{labels} = {value} in {db} or its WAL")
    return Flip(node, name, labels, value, _files(db), copies)


def repair(flip: Flip, db: Path) -> int:
    """Flip the flipped copies back (``flip.value ^ 1`` -> ``flip.value``);
    how many, 0 if SQLite no longer reads the flipped value."""
    if _read_value(db, flip.node, flip.name, flip.labels) != flip.value ^ 1:
        return 0
    return _xor_current(db, flip.node, flip.name, flip.labels, flip.value ^ 1)


# -- the fault on a supervised cluster (keepcount verify --faults corrupt) -----


REFUSED_WITHIN = 30.0
"""Seconds a restarted node has to refuse the flipped store (it reads it at
once: a restore of a small verify store takes milliseconds)."""
REFUSAL = "fails its checksum"
"""What a node that refused a flipped row logs (``CorruptStore``'s message)."""


@dataclass
class CorruptOutcome:
    """What one ``corrupt`` fault saw."""

    node: str
    target: str
    """Where the flip went (the series, or the replica and files)."""
    refused: bool = False
    """A restarted incarnation refused the store (exit naming the checksum)."""
    served: bool = False
    """An incarnation turned ready while the flip was in place: a violation."""
    healed: bool = False
    """The flipped copy was overwritten before the node read it (another
    node's write carried an unflipped page forward): nothing was tested."""
    repaired: int = 0
    """Flipped copies put back."""
    survived: bool = False
    """Cassandra: the cluster ran on with a flipped replica (the history
    checkers judge whether any value went backwards)."""
    detail: str = ""


def _read_row(db: Path, node: str, rnd: random.Random) -> tuple[str, str, int] | None:
    """A counter row of ``node`` with a value of 2 or more, drawn with ``rnd``."""
    with _reader(db) as conn:
        rows = conn.execute(
            "SELECT name, labels, value FROM series WHERE node = ? "
            "AND typeof(value) = 'integer' AND value >= 2 ORDER BY name, labels",
            (node,),
        ).fetchall()
    return rnd.choice(rows) if rows else None


async def corrupt_sqlite(sup: Supervisor, node: str, rnd: random.Random) -> CorruptOutcome:
    """Flip a value of ``node`` on the SQLite file its cluster shares, and
    show that the node refuses it, then put the byte back.

    The node is stopped (SIGSTOP outside a write, so it holds no lock and
    its rows stand still), one of its counter values is flipped in every
    copy, and SIGKILL ends it: the supervisor starts new incarnations,
    which must each refuse the store (``CorruptStore``, exit) and never turn
    ready; meanwhile the other nodes' cluster totals that read the row must
    fail.  Then the byte is flipped back, as an operator restoring the file
    would, and the node comes back.  A new incarnation that turns ready
    while SQLite still returns the flipped value served it: ``served``.
    """
    from keepcount.stores import sqlite_path

    db = Path(sqlite_path(sup.store_url))
    ns = sup.nodes[node]
    await sup.signal(node, "STOP", clean=True)
    row = await asyncio.to_thread(_read_row, db, node, rnd)
    if row is None:
        await sup.signal(node, "KILL")
        return CorruptOutcome(node, "-", detail="no counter value of 2 or more to flip yet")
    name, labels, value = row
    try:
        flip = await asyncio.to_thread(flip_sqlite_value, db, node, name, labels, value)
    except ValueError as exc:  # not found where the record layout puts it
        await sup.signal(node, "CONT")
        return CorruptOutcome(node, f"{name}{labels}", detail=str(exc))
    out = CorruptOutcome(node, f"{name}{labels} = {value} -> {value ^ 1} ({flip.copies} copies)")
    logs = {
        p: p.stat().st_size if p.exists() else 0 for p in sup.launcher.logs.glob(f"{node}*.log")
    }
    before = ns.incarnations
    await sup.signal(node, "KILL")

    def refused_in_log() -> bool:
        for path in sup.launcher.logs.glob(f"{node}*.log"):
            with open(path, "rb") as f:
                f.seek(logs.get(path, 0))
                if REFUSAL.encode() in f.read():
                    return True
        return False

    def decided() -> bool:
        cur = ns.current
        if cur is not None and cur.number > before and cur.ready:
            out.served = True
            return True
        return ns.incarnations > before and refused_in_log()

    try:
        await apoll_until(decided, REFUSED_WITHIN, f"{node} to refuse the flip", interval=0.02)
    except TimeoutError:
        out.detail = f"no incarnation of {node} refused or served within {REFUSED_WITHIN:g} s"
    if out.served:
        raw = await asyncio.to_thread(_read_value, db, node, name, labels)
        if raw == value ^ 1:
            out.detail = f"a new incarnation turned ready while the store held {raw}"
        else:
            out.served, out.healed = False, True
            out.detail = f"the flipped copy was overwritten before the node read it (now {raw})"
    else:
        out.refused = refused_in_log()
    # Put the byte back, as an operator restoring the file would.
    out.repaired = await asyncio.to_thread(repair, flip, db)
    return out


def flip_sstables(data_dir: Path, keyspace: str, table: str) -> list[tuple[Path, int]]:
    """Flip the lowest bit of the middle byte of every ``Data.db`` of
    ``keyspace.table`` under a Cassandra node's ``data_dir`` (stopped, its
    memtables flushed); the (file, offset) of each flip.  keepcount's tables
    are compressed in chunks with a CRC each, so the flip lands in a chunk
    (or its CRC) and every read of that chunk on this replica fails."""
    flips = []
    for path in sorted(data_dir.glob(f"{keyspace}/{table}-*/*-Data.db")):
        size = path.stat().st_size
        if size:
            flips.append((path, size // 2))
            flip_byte(path, size // 2)
    return flips


def flip_byte(path: Path, at: int) -> None:
    """Flip the lowest bit of byte ``at`` of ``path`` (its own inverse), fsynced."""
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 1]))
        f.flush()
        os.fsync(f.fileno())


async def corrupt_cassandra(sup: Supervisor, rnd: random.Random, hold: float) -> CorruptOutcome:
    """Flip a byte in the SSTables of one replica of the cluster's local
    Cassandra store and show that no value goes backwards.

    The replica's memtables are flushed (``nodetool flush``), it is killed,
    a bit of each of its ``node_rows`` SSTables is flipped, and it is
    restarted and held ``hold`` seconds under the workload: its corrupt
    chunks fail their CRC on read (the node is fail-stopped by
    ``disk_failure_policy: stop_paranoid``, ``cluster.cassandra_config``),
    QUORUM reads and writes go on with the other two, and the history
    checkers judge that no read went backwards.  Then the bits are flipped
    back (an operator restoring the files) and the replica restarted again.
    """
    servers: Any = sup.store_servers
    keyspace = sup.store_url.rsplit("/", 1)[-1].split("?", 1)[0]
    i = rnd.randrange(len(servers.nodes))
    node = servers.nodes[i]
    await asyncio.to_thread(servers.nodetool, i, "flush", keyspace)
    await asyncio.to_thread(servers.kill, i)
    flips = await asyncio.to_thread(flip_sstables, node.home_dir / "data", keyspace, "node_rows")
    flipped = {path: os.stat(path).st_ino for path, _ in flips}
    out = CorruptOutcome(
        f"cassandra-{i}", f"{len(flips)} SSTable(s) of {keyspace}.node_rows", survived=False
    )
    if not flips:
        await asyncio.to_thread(servers.restart, i)
        out.detail = "no SSTable to flip (nothing flushed yet)"
        return out
    try:
        await asyncio.to_thread(servers.restart, i)
        out.detail = "restarted"
    except Exception as exc:  # refused to start on a corrupt SSTable: also a refusal
        out.detail = f"did not come back: {str(exc).splitlines()[0]}"
    await asyncio.sleep(hold)
    await asyncio.to_thread(servers.kill, i)
    for path, at in flips:
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino != flipped[path]:
                continue  # compacted away meanwhile (and the name used again)
            await asyncio.to_thread(flip_byte, path, at)
            out.repaired += 1
    await asyncio.to_thread(servers.restart, i)
    out.survived = True
    return out
