"""Flipped bits in the SQLite store: a value changed on disk is refused with
``CorruptStore`` naming the node and the series, never served, never reset
to zero: in the main file, in a WAL frame a first opener would recover, and
in a WAL frame read by a process that opens the store beside a live one."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import keepcount
from keepcount import CorruptStore
from keepcount.cluster.corrupt import find_value, flip_sqlite_value, repair
from keepcount.stores.base import KeyRecord
from keepcount.stores.sqlite import FORMAT_VERSION, SQLiteStore
from keepcount.stores.sqlite.checksums import verify_rows
from keepcount.stores.sqlite.wal import find_flip

NODE = "node-1"
A = '["a"]'

# Commits of node-1's c_total{k="a"} = 1000, 1001, ... 1010, each its own WAL
# frame (one leaf page), then the process leaves without closing the store,
# as a SIGKILL would: the WAL stays beside the file, not checkpointed.
WRITER = textwrap.dedent(
    """
    import os, sys
    from keepcount.stores.base import FamilyDef
    from keepcount.stores.sqlite import SQLiteStore

    store = SQLiteStore(sys.argv[1])
    epoch = store.claim("node-1")
    c = FamilyDef("c_total", "counter", "", ("k",))
    store.write("node-1", epoch, [c], [("c_total", '["a"]', 1000, 1.0),
                                       ("c_total", '["b"]', 2000, 1.0)])
    for value in range(1001, 1011):
        store.write("node-1", epoch, [], [("c_total", '["a"]', value, 1.0)])
    print("written", flush=True)
    if sys.argv[2] == "hold":
        sys.stdin.read()  # the store stays open until stdin closes
    os._exit(0)
    """
)


def write_wal(db: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", WRITER, str(db), "exit"], capture_output=True, text=True, check=True
    )
    assert out.stdout == "written\n", out.stderr
    assert Path(f"{db}-wal").stat().st_size > 0, "the WAL was left behind"


@contextlib.contextmanager
def holding(db: Path) -> Iterator[subprocess.Popen[str]]:
    """A process with the store open (its WAL index valid) until the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(db), "hold"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "written\n"
        yield proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def flip_in_wal(db: Path, value: int) -> int:
    """Flip the lowest bit of c_total{k="a"} = ``value`` in the one WAL frame
    holding it; its offset."""
    wal = Path(f"{db}-wal")
    data = wal.read_bytes()
    (at,) = find_value(data, NODE, "c_total", A, value)
    xor_at(wal, at)
    return at


def xor_at(path: Path, at: int) -> None:
    with path.open("r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 1]))


def raw_value(db: Path, labels: str = A) -> object:
    """What SQLite itself reads, with no checksum of keepcount's."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        row = conn.execute("SELECT value FROM series WHERE labels = ?", (labels,)).fetchone()
    return row[0]


@pytest.mark.g3
def test_a_flipped_value_in_the_main_file_is_refused_naming_node_and_series(
    tmp_path: Path,
) -> None:
    db = tmp_path / "c.db"
    with keepcount.open(f"sqlite:///{db}", node=NODE) as reg:
        c = reg.counter("c_total", "", ["k"])
        for i in range(200):
            c.labels(f"s{i}").inc(i + 2)
    assert not Path(f"{db}-wal").exists(), "closed cleanly: every value is in the main file"
    flip = flip_sqlite_value(db, NODE, "c_total", '["s7"]', 9)
    assert flip.copies == 1
    with pytest.raises(CorruptStore) as e:
        keepcount.open(f"sqlite:///{db}", node=NODE)
    assert str(e.value) == (
        f"store {db}: node 'node-1', series c_total{{k=\"s7\"}}: the stored value 8 fails "
        "its checksum (a flipped bit on disk, or a write keepcount did not make); refusing "
        "it rather than serving it"
    )
    store = SQLiteStore(db)
    try:
        with pytest.raises(CorruptStore, match="node 'node-1', series c_total"):
            store.read_cluster()  # the cluster totals of every other node, too
        with pytest.raises(CorruptStore, match="node 'node-1', series c_total"):
            store.load(NODE)
    finally:
        store.close()
    assert repair(flip, db) == 1, "put back, as an operator restoring the file would"
    with keepcount.open(f"sqlite:///{db}", node=NODE) as reg:
        assert reg.counter("c_total", "", ["k"]).labels("s7").value == 9


@pytest.mark.g1
def test_a_flipped_wal_frame_is_refused_before_sqlite_drops_the_commits_after_it(
    tmp_path: Path,
) -> None:
    db = tmp_path / "c.db"
    write_wal(db)
    at = flip_in_wal(db, 1003)
    # What keepcount guards against: SQLite alone, opening first, takes the
    # flipped frame for a torn tail and drops it and the 7 acknowledged
    # commits after it, silently.
    copy = tmp_path / "copy" / "c.db"
    copy.parent.mkdir()
    for suffix in ("", "-wal"):
        shutil.copyfile(f"{db}{suffix}", f"{copy}{suffix}")
    assert raw_value(copy) == 1002
    flip = find_flip(Path(f"{db}-wal").read_bytes())
    assert flip is not None and flip.offset < at < flip.offset + 24 + 4096
    assert flip.later_frames == 7
    before = db.read_bytes() + Path(f"{db}-wal").read_bytes()
    with pytest.raises(CorruptStore) as e:
        SQLiteStore(db)
    message = str(e.value)
    assert f"the write-ahead log {db}-wal is corrupt: frame {flip.frame} (page " in message
    assert "7 later frame(s) chain from it" in message
    assert "node 'node-1', series c_total{k=\"a\"}: the stored value 1002 fails" in message
    assert db.read_bytes() + Path(f"{db}-wal").read_bytes() == before, "left as it was"
    xor_at(Path(f"{db}-wal"), at)  # the operator puts the byte back
    store = SQLiteStore(db)
    try:
        assert store.load(NODE).values["c_total"] == {A: 1010, '["b"]': 2000}
    finally:
        store.close()


@pytest.mark.g1
def test_a_flipped_last_wal_frame_is_a_torn_tail_and_drops_only_the_last_commit(
    tmp_path: Path,
) -> None:
    """Documented limit: a bad last frame looks like a power cut's torn,
    unsynced tail (synchronous=FULL acknowledged nothing in it)."""
    db = tmp_path / "c.db"
    write_wal(db)
    flip_in_wal(db, 1010)
    assert find_flip(Path(f"{db}-wal").read_bytes()) is None
    store = SQLiteStore(db)
    try:
        assert store.load(NODE).values["c_total"][A] == 1009
    finally:
        store.close()


@pytest.mark.g3
def test_a_flipped_wal_frame_read_beside_a_live_process_is_refused_by_the_row_checksum(
    tmp_path: Path,
) -> None:
    db = tmp_path / "c.db"
    with holding(db):
        flip_in_wal(db, 1010)  # the page's latest version: what every reader gets
        assert raw_value(db) == 1011, "SQLite reads a live WAL without checking its frames"
        store = SQLiteStore(db)  # not the first opener: no recovery, no WAL check
        try:
            with pytest.raises(CorruptStore) as e:
                store.load(NODE)
            assert "node 'node-1', series c_total{k=\"a\"}: the stored value 1011 fails" in str(
                e.value
            )
            with pytest.raises(CorruptStore, match="series c_total"):
                store.read_cluster("c_total")
        finally:
            store.close()


@pytest.mark.g1
def test_a_version_3_file_is_upgraded_with_a_checksum_on_every_row(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    with keepcount.open(f"sqlite:///{db}", node=NODE) as reg:
        c = reg.counter("c_total", "", ["k"])
        for i in range(50):
            c.labels(f"s{i}").inc(i + 2)
        reg.histogram("h_seconds", "", buckets=[1.0]).observe(0.5)
    with contextlib.closing(sqlite3.connect(db)) as conn:  # what format 3 wrote
        for table in ("series", "families", "idempotency"):
            conn.execute(f"ALTER TABLE {table} DROP COLUMN crc")
        conn.execute(
            "INSERT INTO idempotency VALUES ('k1', 'node-1', 'fp', '{\"n\": 1}', 't', 9e9)"
        )
        conn.execute("UPDATE meta SET value = '3' WHERE key = 'format_version'")
        conn.execute("PRAGMA user_version = 3")
        conn.commit()
    SQLiteStore(db).close()
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == FORMAT_VERSION == 4
        assert verify_rows(conn, db) == 2 + 51 + 1, "every row has its checksum"
        assert conn.execute("SELECT count(*) FROM series WHERE crc = 0").fetchone()[0] == 0
    with keepcount.open(f"sqlite:///{db}", node=NODE) as reg:
        assert reg.counter("c_total", "", ["k"]).labels("s40").value == 42
    store = SQLiteStore(db)
    try:
        assert store.lookup_key("k1") is not None
    finally:
        store.close()
    flip_sqlite_value(db, NODE, "c_total", '["s40"]', 42)
    with pytest.raises(CorruptStore, match=r"series c_total\{k=\"s40\"\}: the stored value 43"):
        keepcount.open(f"sqlite:///{db}", node=NODE)


@pytest.mark.g2
def test_a_flipped_idempotency_receipt_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    result = '{"value": 5, "receipt": "r-1"}'
    store = SQLiteStore(db)
    try:
        epoch = store.claim(NODE)
        store.write(NODE, epoch, [], [], [KeyRecord("key-1", NODE, "fp", result, "t", 9e9)])
    finally:
        store.close()
    data = db.read_bytes()
    at = data.index(result.encode())
    db.write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :])
    store = SQLiteStore(db)
    try:
        with pytest.raises(CorruptStore, match="idempotency key 'key-1' fails its checksum"):
            store.lookup_key("key-1")
        with pytest.raises(CorruptStore, match="idempotency key 'key-1'"):
            store.lookup_keys(["key-1", "other"])
    finally:
        store.close()
