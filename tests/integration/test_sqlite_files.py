"""Damaged, foreign and full store files are refused, never reset to zero."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import keepcount
from keepcount import ClaimConflict, CorruptStore, Fenced, StoreUnavailable
from keepcount.stores.base import FamilyDef
from keepcount.stores.sqlite import APPLICATION_ID, FORMAT_VERSION, SQLiteStore
from keepcount.stores.sqlite.checksums import series_crc


def make_store(path: Path, series: int = 2000) -> None:
    with keepcount.open(f"sqlite:///{path}", node="node-1", max_children=None) as reg:
        c = reg.counter("c_total", "", ["k"])
        for i in range(series):
            c.labels(f"series-{i:06d}").inc(i + 1)


def digest(path: Path) -> str:
    """The file and its WAL: a write that has not been checkpointed lives in the WAL."""
    h = hashlib.sha256(path.read_bytes())
    wal = path.with_name(path.name + "-wal")
    h.update(wal.read_bytes() if wal.exists() else b"")
    return h.hexdigest()


def refused(path: Path, match: str) -> CorruptStore:
    before = digest(path)
    with pytest.raises(CorruptStore, match=match) as e:
        keepcount.open(f"sqlite:///{path}", node="node-1")
    assert str(path) in str(e.value), "the message names the file"
    assert digest(path) == before, "a refused file is left exactly as it was"
    return e.value


@pytest.mark.g6
def test_garbage_over_a_page_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    make_store(db)
    size = db.stat().st_size
    with db.open("r+b") as f:
        f.seek(size // 2 // 4096 * 4096)
        f.write(os.urandom(4096))
    refused(db, "corrupt|malformed")


@pytest.mark.g6
def test_a_truncated_file_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    make_store(db)
    with db.open("r+b") as f:
        f.truncate(db.stat().st_size // 2)
    refused(db, "truncated")


@pytest.mark.g1
def test_a_file_cut_short_by_a_crash_in_a_checkpoint_opens_whole(tmp_path: Path) -> None:
    """A checkpoint writes page 1, with the new page count, before the pages
    that extend the file; a kill in between leaves a file shorter than its
    header says, beside a whole WAL.  That is not damage: SQLite replays the
    WAL on open.  (Seen for real: a node SIGKILLed in a cluster test came back
    refused as "truncated".)  Reproduced from a snapshot of the files taken
    while a writer holds them open, with its WAL not checkpointed."""
    live = tmp_path / "live" / "c.db"
    live.parent.mkdir()
    make_store(live, series=10)
    conn = sqlite3.connect(live, isolation_level=None)
    try:
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO series(node, name, labels, value, created, crc) VALUES (?,?,?,?,?,?)",
            [
                ("node-1", "c_total", k, i + 1, 1.0, series_crc("node-1", "c_total", k, i + 1))
                for i in range(20_000)
                for k in [f'["more-{i:06d}"]']
            ],
        )
        conn.execute("COMMIT")
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        crashed = tmp_path / "c.db"
        for suffix in ("", "-wal"):  # what a SIGKILL leaves (the -shm is rebuilt)
            crashed.with_name(crashed.name + suffix).write_bytes(
                live.with_name(live.name + suffix).read_bytes()
            )
    finally:
        conn.close()
    assert crashed.stat().st_size < pages * 4096
    with crashed.open("r+b") as f:  # page 1 already copied back, the rest not yet
        f.seek(28)
        f.write(pages.to_bytes(4, "big"))
    with keepcount.open(f"sqlite:///{crashed}", node="node-1", max_children=None) as reg:
        fam = reg.counter("c_total", "", ["k"])
        assert len(fam) == 20_010
        assert fam.labels("more-019999").value == 20_000
        assert fam.labels("series-000009").value == 10
    # Without the WAL the same short file has nothing to be made whole with.
    wal = crashed.with_name(crashed.name + "-wal")
    wal.unlink()
    with crashed.open("r+b") as f:
        f.truncate(crashed.stat().st_size // 2)
        f.seek(28)
        f.write(pages.to_bytes(4, "big"))
    refused(crashed, "truncated")


@pytest.mark.g6
def test_an_empty_file_is_refused_not_initialised(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    db.touch()
    refused(db, "empty file")
    assert db.stat().st_size == 0


@pytest.mark.g6
def test_a_foreign_file_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    db.write_text("name,value\nx,1\n" * 20)
    refused(db, "not an SQLite database")


@pytest.mark.g6
def test_another_applications_sqlite_database_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE series(node, name, labels, value)")
    refused(db, "not a keepcount store")


@pytest.mark.g6
def test_an_unknown_format_version_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    make_store(db, series=3)
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {FORMAT_VERSION + 1}")
    refused(db, f"format version {FORMAT_VERSION + 1}.*upgrade keepcount")


@pytest.mark.g1
def test_a_version_1_file_is_upgraded_in_place_with_its_values(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    make_store(db, series=3)
    with sqlite3.connect(db) as conn:  # what keepcount 0.1 (format 1) wrote
        conn.execute("DROP TABLE idempotency")
        conn.execute("ALTER TABLE series DROP COLUMN crc")
        conn.execute("ALTER TABLE families DROP COLUMN crc")
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'format_version'")
        conn.execute("PRAGMA user_version = 1")
    with keepcount.open(f"sqlite:///{db}", node="node-1") as reg:
        assert reg.counter("c_total", "", ["k"]).labels("series-000002").value == 3
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == FORMAT_VERSION
        assert conn.execute("SELECT count(*) FROM idempotency").fetchone()[0] == 0


@pytest.mark.g6
def test_a_version_1_file_with_a_foreign_table_in_the_way_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    make_store(db, series=3)
    with sqlite3.connect(db) as conn:
        conn.execute("ALTER TABLE series DROP COLUMN crc")
        conn.execute("ALTER TABLE families DROP COLUMN crc")
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'format_version'")
        conn.execute("PRAGMA user_version = 1")
    refused(db, "schema")


# What format 2 created: families.kind allowed only the native kinds.
SCHEMA_V2 = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL) STRICT;
CREATE TABLE nodes(
    node TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL CHECK (epoch > 0),
    claimed_at REAL,
    released_at REAL,
    pid INTEGER,
    host TEXT
) STRICT;
CREATE TABLE families(
    node TEXT NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('counter', 'histogram')),
    help TEXT NOT NULL,
    labelnames TEXT NOT NULL,
    buckets TEXT NOT NULL,
    PRIMARY KEY (node, name)
) STRICT, WITHOUT ROWID;
CREATE TABLE series(
    node TEXT NOT NULL,
    name TEXT NOT NULL,
    labels TEXT NOT NULL,
    value ANY NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (node, name, labels)
) STRICT, WITHOUT ROWID;
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

G = FamilyDef("g_live", "prometheus.gauge.livesum", "a gauge", ("k",))


def autocommit(path: Path) -> contextlib.closing[sqlite3.Connection]:
    return contextlib.closing(sqlite3.connect(path, isolation_level=None))


def make_v2_store(path: Path) -> None:
    """A format-2 file with a counter and a histogram of node-1 and a key."""
    with autocommit(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
        conn.execute("BEGIN")
        for stmt in SCHEMA_V2.split(";"):
            conn.execute(stmt)
        conn.executemany(
            "INSERT INTO meta(key, value) VALUES (?, ?)",
            [("format", "keepcount"), ("format_version", "2"), ("created_at", "1.0")],
        )
        conn.execute("INSERT INTO nodes VALUES ('node-1', 4, 1.0, 2.0, 1, 'host')")
        conn.executemany(
            "INSERT INTO families VALUES (?, ?, ?, ?, ?, ?)",
            [("node-1", "c_total", "counter", "a counter", '["k"]', "[]"),
             ("node-1", "h_seconds", "histogram", "", "[]", "[0.5]")],
        )  # fmt: skip
        conn.executemany(
            "INSERT INTO series VALUES (?, ?, ?, ?, ?)",
            [("node-1", "c_total", '["a"]', 7, 10.0),
             ("node-1", "h_seconds", "[]", "[1,2,3.5]", 11.0)],
        )  # fmt: skip
        conn.execute("INSERT INTO idempotency VALUES ('k1', 'node-1', 'fp', '{}', 't', 9e9)")
        conn.execute("PRAGMA user_version=2")
        conn.execute("COMMIT")


def schema_of(path: Path) -> dict[str, tuple[object, ...]]:
    """Each table's (type, strict, without rowid, sql)."""
    with autocommit(path) as conn:
        listed = {r[1]: (r[2], r[5], r[4]) for r in conn.execute("PRAGMA main.table_list")}
        sql = dict(conn.execute("SELECT name, sql FROM sqlite_schema WHERE type = 'table'"))
    return {t: (*listed[t], sql[t]) for t in sql}


@pytest.mark.g1
def test_a_version_2_file_is_upgraded_in_place_and_then_holds_prometheus_families(
    tmp_path: Path,
) -> None:
    db = tmp_path / "c.db"
    make_v2_store(db)
    with (
        autocommit(db) as conn,
        pytest.raises(sqlite3.IntegrityError, match="CHECK"),  # what format 2 refuses
    ):
        conn.execute("INSERT INTO families VALUES ('n', 'g', 'prometheus.counter', '', '[]', '[]')")
    before = schema_of(db)
    store = SQLiteStore(db)
    try:
        with autocommit(db) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == FORMAT_VERSION == 4
            assert conn.execute(
                "SELECT value FROM meta WHERE key = 'format_version'"
            ).fetchone() == ("4",)
            assert conn.execute("SELECT count(*) FROM idempotency").fetchone()[0] == 1
        after = schema_of(db)
        families = after.pop("families")
        assert families[:3] == before.pop("families")[:3] == ("table", 1, 1), (
            "still STRICT and WITHOUT ROWID"
        )
        assert "GLOB 'prometheus.*'" in str(families[3])
        for table in ("series", "idempotency"):  # version 4 adds the row checksums
            assert after[table][:3] == before[table][:3] == ("table", 1, 1)
            assert " crc INTEGER NOT NULL DEFAULT 0" in str(after.pop(table)[3])
            before.pop(table)
        assert after == before, "only families is rebuilt"
        snap = store.load("node-1")
        assert snap.families == {
            "c_total": FamilyDef("c_total", "counter", "a counter", ("k",)),
            "h_seconds": FamilyDef("h_seconds", "histogram", "", (), (0.5, float("inf"))),
        }
        assert snap.values == {"c_total": {'["a"]': 7}, "h_seconds": {"[]": "[1,2,3.5]"}}
        assert store.load_created("node-1") == {
            "c_total": {'["a"]': 10.0},
            "h_seconds": {"[]": 11.0},
        }
        epoch = store.claim("node-1")
        assert epoch == 5, "the node's epoch survived the upgrade"
        store.write("node-1", epoch, [G], [("g_live", '["a"]', '[2.5,"+Inf"]', 12.0)])
    finally:
        store.close()
    again = SQLiteStore(db)
    try:
        again.claim("node-1")
        snap = again.load("node-1")
        assert snap.families["g_live"] == G
        assert snap.values["g_live"] == {'["a"]': '[2.5,"+Inf"]'}
        assert snap.values["c_total"] == {'["a"]': 7}
    finally:
        again.close()


@pytest.mark.g6
def test_a_version_2_file_upgrade_that_fails_leaves_it_at_version_2(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    make_v2_store(db)
    with autocommit(db) as conn:  # in the way of the rebuild
        conn.execute("CREATE TABLE families_v3(x)")
    with pytest.raises(StoreUnavailable, match="families_v3"):
        SQLiteStore(db)
    with autocommit(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert conn.execute("SELECT count(*) FROM families").fetchone()[0] == 2
        assert conn.execute("SELECT count(*) FROM families_v3").fetchone()[0] == 0


@pytest.mark.g6
def test_a_version_3_file_whose_families_refuse_prometheus_kinds_is_refused(
    tmp_path: Path,
) -> None:
    db = tmp_path / "c.db"
    make_v2_store(db)
    with autocommit(db) as conn:  # a format-2 file claiming to be 3
        conn.execute("UPDATE meta SET value = '3' WHERE key = 'format_version'")
        conn.execute("PRAGMA user_version = 3")
    before = digest(db)
    with pytest.raises(CorruptStore, match="families table is not that of format version 3"):
        SQLiteStore(db)
    assert digest(db) == before


@pytest.mark.g6
@pytest.mark.parametrize(
    ("value", "vtype"),
    [(5, "integer"), ("[1,2", "text"), ("NaN", "text"), ("", "text"), (2.5, "real")],
)
def test_a_prometheus_value_that_is_not_json_text_is_refused_at_claim(
    tmp_path: Path, value: object, vtype: str
) -> None:
    db = tmp_path / "c.db"
    store = SQLiteStore(db)
    try:
        epoch = store.claim("node-1")
        store.write("node-1", epoch, [G], [("g_live", '["a"]', "[1.0,2.0]", 1.0),
                                           ("g_live", '["b"]', "null", 1.0)])  # fmt: skip
    finally:
        store.close()
    with autocommit(db) as conn:
        conn.execute("UPDATE series SET value = ? WHERE labels = '[\"b\"]'", (value,))
    before = digest(db)
    store = SQLiteStore(db)
    try:
        with pytest.raises(CorruptStore) as e:
            store.claim("node-1")
    finally:
        store.close()
    assert str(e.value) == (
        f"store {db}: node 'node-1' holds a prometheus.gauge.livesum g_live[\"b\"] with a "
        f"value of type {vtype} that keepcount cannot have written; refusing it"
    )
    assert digest(db) == before, "a refused node is left exactly as it was"
    again = SQLiteStore(db)
    try:
        assert again.nodes()[0].epoch == 1, "the refused claim took no epoch"
    finally:
        again.close()


@pytest.mark.g6
def test_a_family_of_an_unknown_kind_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    store = SQLiteStore(db)
    try:
        epoch = store.claim("node-1")
        store.write("node-1", epoch, [G], [("g_live", '["a"]', "[1.0,2.0]", 1.0)])
    finally:
        store.close()
    with autocommit(db) as conn:  # passes the CHECK, not check_kind
        conn.execute("UPDATE families SET kind = 'prometheus.Gauge'")
    store = SQLiteStore(db)
    try:
        with pytest.raises(CorruptStore, match=r"'g_live' has unknown kind 'prometheus\.Gauge'"):
            store.load("node-1")
        with pytest.raises(CorruptStore, match="unknown kind"):
            store.read_cluster()
    finally:
        store.close()


@pytest.mark.g6
def test_a_value_of_the_wrong_type_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    make_store(db, series=3)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE series SET value = 'many' WHERE labels = '[\"series-000001\"]'")
    refused(db, "counter c_total.*type text")


@pytest.mark.g6
def test_a_series_without_its_definition_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    make_store(db, series=3)
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM families")
    refused(db, "without a family definition")


@pytest.mark.g6
def test_a_histogram_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    with keepcount.open(f"sqlite:///{db}", node="node-1") as reg:
        reg.histogram("h_seconds", "", buckets=[1, 2]).observe(1.5)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE series SET value = '[1,2,3]'")
    refused(db, "histogram h_seconds")


@pytest.mark.g6
def test_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(keepcount.InvalidInput, match="does not exist"):
        keepcount.open(f"sqlite:///{tmp_path}/nope/c.db", node="node-1")


@pytest.mark.g6
@pytest.mark.parametrize(
    "url",
    ["sqlite://rel.db", "sqlite:///:memory:", "redis://x", "counters.db", "sqlite:///a.db?x=1"],
)
def test_bad_store_urls(url: str) -> None:
    with pytest.raises(keepcount.InvalidInput):
        keepcount.open(url, node="node-1")


HOLDER = textwrap.dedent(
    """
    import sys, keepcount
    reg = keepcount.open(sys.argv[1], node="node-1")
    reg.counter("c_total").inc(5)
    reg.commit_sync()
    print("held", reg.epoch, flush=True)
    sys.stdin.read()
    """
)


@pytest.mark.g4
def test_a_second_process_cannot_claim_a_live_node_id(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/c.db"
    with subprocess.Popen([sys.executable, "-c", HOLDER, url], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as holder:  # fmt: skip
        check_exclusive_claim(url, holder)


def check_exclusive_claim(url: str, holder: subprocess.Popen[str]) -> None:
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline().split()
        assert line[0] == "held", line
        with pytest.raises(ClaimConflict, match=f"pid {holder.pid}"):
            keepcount.open(url, node="node-1", max_slots=1)
        with keepcount.open(url, node="node-1") as reg:  # a second slot of the host, not its own
            assert reg.node == "node-1@1"
            assert reg.counter("c_total").value == 0
        with keepcount.open(url, node="node-2") as reg:  # other ids in the same file are free
            reg.counter("c_total").inc()
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        with keepcount.open(url, node="node-1") as reg:  # the kernel dropped the dead holder's lock
            assert reg.epoch == int(line[1]) + 1
            assert reg.counter("c_total").value == 5
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.g4
def test_a_stale_incarnation_is_fenced_even_if_its_lock_file_is_deleted(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/c.db"
    old = keepcount.open(url, node="node-1", flush_interval=None)
    old.counter("c_total").inc(1)
    old.commit_sync()
    for f in (tmp_path / "c.db-locks").iterdir():  # an operator "cleans up" lock files
        f.unlink()
    new = keepcount.open(url, node="node-1", flush_interval=None)
    assert new.epoch == old.epoch + 1
    new.counter("c_total").inc(1)
    new.commit_sync()
    old.counter("c_total").inc(100)
    with pytest.raises(Fenced):
        old.commit_sync()
    assert old.fenced
    old.close()
    new.close()
    with keepcount.open(url, node="node-1") as reg:
        assert reg.counter("c_total").value == 2


FILLER = textwrap.dedent(
    """
    import resource, signal, sys, keepcount
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG
    reg = keepcount.open(sys.argv[1], node="node-1", flush_interval=None, max_children=None)
    c = reg.counter("c_total", "", ["k"])
    c.labels("first").inc(7)
    reg.commit_sync()
    size = sum(p.stat().st_size for p in __import__("pathlib").Path(sys.argv[2]).glob("c.db*"))
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 64 * 1024, size + 64 * 1024))
    for i in range(2000):
        c.labels("x" * 900 + str(i)).inc()
    c.labels("first").inc(1)
    try:
        reg.commit_sync()
    except keepcount.StoreUnavailable as exc:
        print("refused", exc, flush=True)
    else:
        print("acknowledged", flush=True)
    print("memory", c.labels("first").value, flush=True)
    """
)


@pytest.mark.g1
def test_a_file_size_limit_fails_the_commit_and_acknowledges_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/c.db"
    out = subprocess.run([sys.executable, "-c", FILLER, url, str(tmp_path)], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("refused"), out.stdout
    assert "memory 8" in out.stdout
    with keepcount.open(url, node="node-1", max_children=None) as reg:
        fam = reg.counter("c_total", "", ["k"])
        assert fam.labels("first").value == 7, "the refused flush left no trace"
        assert len(fam) == 1


@pytest.fixture
def small_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real 2 MiB tmpfs, so the disk really fills up (ENOSPC)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 0, (
        f"cannot mount a tmpfs for the disk-full test ({res.stderr.strip()}): run the tests as "
        "root (CI does) or in a container with CAP_SYS_ADMIN"
    )
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.g1
def test_a_full_disk_fails_the_commit_and_recovers_when_space_returns(small_fs: Path) -> None:
    url = f"sqlite:///{small_fs}/c.db"
    reg = keepcount.open(url, node="node-1", flush_interval=None, max_children=None)
    try:
        c = reg.counter("c_total", "", ["k"])
        c.labels("first").inc(7)
        reg.commit_sync()
        filler = small_fs / "filler"
        with filler.open("wb") as f:  # take every free byte
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        for i in range(500):
            c.labels("y" * 500 + str(i)).inc()
        c.labels("first").inc(1)
        with pytest.raises(StoreUnavailable, match=r"full|disk"):
            reg.commit_sync()
        filler.unlink()
        reg.commit_sync()  # space is back: the same values are written, none lost
    finally:
        reg.close()
    with keepcount.open(url, node="node-1", max_children=None) as again:
        fam = again.counter("c_total", "", ["k"])
        assert fam.labels("first").value == 8
        assert len(fam) == 501


@pytest.mark.g6
def test_store_refuses_use_after_close(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "c.db")
    s.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        s.claim("node-1")
