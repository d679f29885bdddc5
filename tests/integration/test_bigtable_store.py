"""What the Bigtable store does beyond the shared Store contract, on the emulator.

The conformance suite (``test_store_conformance.py``) holds the store to the
contract every backend shares; these tests look at what is Bigtable's own:
the table it creates and the tables it refuses, its cell timestamps, the
conditional write that fences every flush, the renewal of its logical
clock, idempotency keys whose owner never recorded them, flushes too big
for one request, and errors translated at the seam.  Cells are inspected
with the client library directly (``raw``), beside the store.

The emulator keeps data in memory only; tests that kill or pause a server
start a private emulator of their own.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import bigtable_fixtures
from keepcount import ClaimConflict, Fenced, InvalidInput
from keepcount.cluster.bigtable import BigtableEmulator
from keepcount.errors import CorruptStore, KeyConflict, OutcomeUnknown, StoreUnavailable
from keepcount.registry import Registry
from keepcount.stores.base import FamilyDef, KeyRecord, Store
from keepcount.stores.bigtable import (
    EMULATOR_ENV,
    FAMILIES,
    KEY_GC_AGE,
    SEQ_BITS,
    BigtableStore,
    BigtableURL,
    parse_url,
)

C = FamilyDef("c_total", "counter", "a counter", ("k",))


@pytest.fixture
def store(bigtable_url: str) -> Iterator[BigtableStore]:
    s = BigtableStore(bigtable_url)
    yield s
    s.close()


@pytest.fixture
def other(bigtable_url: str) -> Iterator[BigtableStore]:
    s = BigtableStore(bigtable_url)
    yield s
    s.close()


@pytest.fixture
def raw(
    bigtable_up: BigtableEmulator, bigtable_table: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Any]:
    """The table through the client library itself, to look at cells."""
    from google.cloud.bigtable.data import BigtableDataClient

    monkeypatch.setenv(EMULATOR_ENV, bigtable_up.host)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "Connecting to Bigtable emulator"
        client = BigtableDataClient(project="keepcount")
    yield client.get_table("emulator", bigtable_table)
    client.close()


def cells(raw: Any, row: bytes, family: str) -> dict[bytes, list[tuple[int, bytes]]]:
    """Every version of every cell of ``family`` in ``row``: qualifier -> [(ts, value)]."""
    from google.cloud.bigtable.data.row_filters import FamilyNameRegexFilter

    out: dict[bytes, list[tuple[int, bytes]]] = {}
    found = raw.read_row(row, row_filter=FamilyNameRegexFilter(family))
    for c in [] if found is None else found.cells:
        out.setdefault(c.qualifier, []).append((c.timestamp_micros, c.value))
    return out


def keyed(name: str, node: str, *, expires: float | None = None) -> KeyRecord:
    return KeyRecord(
        name, node, "fp", f'{{"value":1,"key":"{name}"}}', f"token-{name}-{node}",
        time.time() + 3600 if expires is None else expires,
    )  # fmt: skip


# -- URLs and tables ------------------------------------------------------------------


def test_urls_name_project_instance_table_and_options() -> None:
    assert parse_url("bigtable://my-project/my-instance/counters") == BigtableURL(
        "my-project", "my-instance", "counters"
    )
    assert parse_url(
        "bigtable://p-1/inst-1/t.1?app_profile=single&emulator=127.0.0.1:8086"
    ) == BigtableURL("p-1", "inst-1", "t.1", "single", "127.0.0.1:8086")
    for bad in (
        "bigtable://p/i",  # no table
        "bigtable://p/i/t/x",  # too deep
        "bigtable:///i/t",  # no project
        "bigtable://P/i/t",  # upper case project
        "bigtable://p/i/t?emulator=nohost",
        "bigtable://p/i/t?colour=blue",
        "cassandra://p/i/t",
    ):
        with pytest.raises(InvalidInput):
            parse_url(bad)


def test_the_store_creates_its_table_with_one_version_per_cell(
    store: BigtableStore, bigtable_up: BigtableEmulator, bigtable_table: str
) -> None:
    """Every family keeps one version; the key families also drop cells past
    ``max_age`` (their timestamps are set from the keys' expiry)."""
    admin = bigtable_fixtures.admin_client(bigtable_up)
    try:
        table = admin.get_table(
            request={"name": bigtable_fixtures.table_path(bigtable_table), "view": "SCHEMA_VIEW"}
        )
    finally:
        admin.transport.close()
    assert set(table.column_families) == set(FAMILIES)
    for name, family in table.column_families.items():
        rule = family.gc_rule
        if name in ("k", "o"):
            one, aged = rule.union.rules
            assert one.max_num_versions == 1
            assert aged.max_age.total_seconds() == KEY_GC_AGE
        else:
            assert rule.max_num_versions == 1


@pytest.mark.g6
def test_a_table_that_is_not_keepcounts_is_refused_and_left_alone(
    bigtable_up: BigtableEmulator, bigtable_table: str, raw: Any
) -> None:
    from google.cloud.bigtable.data import SetCell

    admin = bigtable_fixtures.admin_client(bigtable_up)
    try:
        admin.create_table(
            request={
                "parent": bigtable_fixtures.table_path(bigtable_table).rsplit("/tables/", 1)[0],
                "table_id": bigtable_table,
                "table": {"column_families": {"cf": {}}},
            }
        )
    finally:
        admin.transport.close()
    raw.mutate_row(b"user#1", SetCell("cf", b"name", b"alice", 1000))
    with pytest.raises(CorruptStore, match=f"{bigtable_table}.*not a keepcount store"):
        BigtableStore(bigtable_up.url_for(bigtable_table))
    assert cells(raw, b"user#1", "cf") == {b"name": [(1000, b"alice")]}, "left as it was"


@pytest.mark.g6
def test_a_keepcount_table_of_another_format_version_is_refused(
    store: BigtableStore, bigtable_url: str, raw: Any
) -> None:
    from google.cloud.bigtable.data import DeleteRangeFromColumn, SetCell

    raw.mutate_row(
        b"meta",
        [DeleteRangeFromColumn("m", b"format_version"), SetCell("m", b"format_version", b"2", 0)],
    )
    with pytest.raises(CorruptStore, match="format version 2"):
        BigtableStore(bigtable_url)


@pytest.mark.g1
def test_a_store_that_cannot_be_reached_is_unavailable(tmp_path: Path) -> None:
    emulator = BigtableEmulator(tmp_path)  # never started: nothing listens on its port
    with pytest.raises(StoreUnavailable):
        BigtableStore(emulator.url_for("counters"), timeout=2)


# -- timestamps and fencing ------------------------------------------------------------


@pytest.mark.g4
def test_cells_carry_millisecond_aligned_logical_timestamps(
    store: BigtableStore, other: BigtableStore, raw: Any
) -> None:
    """(generation << 28 | sequence) * 1000: aligned to Bigtable's millisecond
    granularity, growing with every flush and with every claim."""
    e1 = store.claim("node-1", epoch=1)
    store.write("node-1", e1, [C], [("c_total", '["a"]', 1, 1.0)])
    store.write("node-1", e1, [], [("c_total", '["a"]', 2, 1.0)])
    first = cells(raw, b"n#node-1", "v")[b'c_total\x00["a"]'][0][0]
    e2 = other.claim("node-1", epoch=2)
    other.write("node-1", e2, [], [("c_total", '["a"]', 3, 1.0)])
    second = cells(raw, b"n#node-1", "v")[b'c_total\x00["a"]'][0][0]
    for ts in (first, second):
        assert ts % 1000 == 0
    assert divmod(first // 1000, 1 << SEQ_BITS) == (1, 2), "generation 1, flush 2"
    assert divmod(second // 1000, 1 << SEQ_BITS) == (2, 1), "the next claim: generation 2"


@pytest.mark.g1
def test_a_write_that_lands_late_changes_nothing(store: BigtableStore, raw: Any) -> None:
    """A flush whose reply was lost (OutcomeUnknown) may land after a later one
    of the same incarnation: its older timestamp loses."""
    from google.cloud.bigtable.data import SetCell

    e = store.claim("node-1")
    store.write("node-1", e, [C], [("c_total", '["a"]', 5, 1.0)])
    (ts5, _), *_ = cells(raw, b"n#node-1", "v")[b'c_total\x00["a"]']
    store.write("node-1", e, [], [("c_total", '["a"]', 6, 1.0)])
    raw.mutate_row(b"n#node-1", SetCell("v", b'c_total\x00["a"]', b"i" + (5).to_bytes(8), ts5))
    assert store.load("node-1").values["c_total"] == {'["a"]': 6}


@pytest.mark.g4
def test_every_flush_is_fenced_by_the_rows_incarnation(
    store: BigtableStore, other: BigtableStore, raw: Any
) -> None:
    """The conditional write checks ``m:inc``: once another claim raised it,
    a flush of the old incarnation writes nothing, not even a series the new
    one never heard of, and says so (Fenced, not acknowledged)."""
    old = store.claim("node-1", epoch=1)
    store.write("node-1", old, [C], [("c_total", '["a"]', 1, 1.0)])
    other.claim("node-1", epoch=1)  # the same coordinator epoch again: a new incarnation
    before = cells(raw, b"n#node-1", "v")
    with pytest.raises(Fenced):  # an empty write too: it reads the incarnation
        store.write("node-1", old, [], [])
    again = store.claim("node-1", epoch=1)  # the handle claims anew, then loses again
    other.release("node-1", 1)
    other.claim("node-1", epoch=1)
    with pytest.raises(Fenced):
        store.write("node-1", again, [], [("c_total", '["new"]', 7, 1.0)])
    with pytest.raises(Fenced):  # and the handle stays fenced
        store.write("node-1", again, [], [("c_total", '["new"]', 7, 1.0)])
    assert cells(raw, b"n#node-1", "v") == before


@pytest.mark.g5
def test_cluster_totals_of_one_metric_are_one_scan_of_its_columns(
    store: BigtableStore, other: BigtableStore
) -> None:
    """``read_cluster(name)`` selects the family column ``name`` and the series
    columns ``name\\0...`` of every node, not metrics whose names merely
    start with it."""
    d = FamilyDef("c_total_x", "counter", "another", ("k",))
    e1, e2 = store.claim("node-1"), other.claim("node-2")
    store.write(
        "node-1", e1, [C, d], [("c_total", '["a"]', 1, 1.0), ("c_total_x", '["a"]', 5, 1.0)]
    )
    other.write("node-2", e2, [d, C], [("c_total_x", "[]", 6, 1.0), ("c_total", '["b"]', 2, 1.0)])
    snap = store.read_cluster("c_total")
    assert snap.rows == [("node-1", "c_total", '["a"]', 1), ("node-2", "c_total", '["b"]', 2)]
    assert snap.families == {"node-1": {"c_total": C}, "node-2": {"c_total": C}}
    assert len(store.read_cluster().rows) == 4


@pytest.mark.g4
def test_an_unreleased_claim_is_held_but_a_released_one_is_free(
    store: BigtableStore, other: BigtableStore
) -> None:
    e = store.claim("node-1")
    with pytest.raises(ClaimConflict, match="never released"):
        other.claim("node-1")
    store.release("node-1", e)
    assert other.claim("node-1") == e + 1
    store.release("node-1", e)  # a stale release changes nothing
    with pytest.raises(ClaimConflict):
        store.claim("node-1")


@pytest.mark.g4
def test_the_clock_renews_its_generation_when_the_sequence_runs_out(
    store: BigtableStore, other: BigtableStore, raw: Any
) -> None:
    store.max_seq = 3
    e = store.claim("node-1", epoch=1)
    stamps = []
    for i in range(8):
        store.write("node-1", e, [C], [("c_total", '["a"]', i, 1.0)])
        stamps.append(cells(raw, b"n#node-1", "v")[b'c_total\x00["a"]'][0][0])
    assert stamps == sorted(set(stamps)), "strictly growing across renewals"
    assert [ts // 1000 >> SEQ_BITS for ts in stamps] == [1, 1, 1, 2, 2, 2, 3, 3]
    assert store.load("node-1").values["c_total"] == {'["a"]': 7}
    other.claim("node-1", epoch=2)  # the next claim starts above every renewal
    with pytest.raises(Fenced):  # a fenced handle cannot renew either
        store.write("node-1", e, [], [("c_total", '["a"]', 99, 1.0)])
    assert other.load("node-1").values["c_total"] == {'["a"]': 7}


# -- idempotency keys -------------------------------------------------------------------


@pytest.mark.g2
def test_a_key_taken_but_not_recorded_is_pending_until_its_owner_is_fenced(
    bigtable_url: str, store: BigtableStore, other: BigtableStore
) -> None:
    """node-1 takes k1 but its write fails (another key of it was recorded):
    k1 is *pending* for node-2 while node-1's incarnation may still record
    it, and free once a new incarnation of node-1 fenced the old one."""
    third = BigtableStore(bigtable_url)
    try:
        e3 = third.claim("node-3")
        third.write("node-3", e3, [C], [("c_total", '["a"]', 1, 1.0)], [keyed("kx", "node-3")])
        e1 = store.claim("node-1", epoch=1)
        with pytest.raises(KeyConflict) as first:
            store.write(
                "node-1", e1, [C], [("c_total", '["a"]', 1, 1.0)],
                [keyed("k1", "node-1"), keyed("kx", "node-1")],
            )  # fmt: skip
        assert first.value.keys == ["kx"] and first.value.pending == []
        e2 = other.claim("node-2")
        with pytest.raises(KeyConflict) as second:
            other.write("node-2", e2, [C], [("c_total", '["a"]', 1, 1.0)], [keyed("k1", "node-2")])
        assert second.value.keys == [] and second.value.pending == ["k1"]
        assert other.lookup_key("k1") is None, "not recorded anywhere yet"
        assert other.load("node-2").series_count() == 0, "the refused write wrote nothing"

        third.claim("node-1", epoch=2)  # node-1's new incarnation: the old one is fenced
        record = keyed("k1", "node-2")
        other.write("node-2", e2, [C], [("c_total", '["a"]', 1, 1.0)], [record])
        assert store.lookup_key("k1") == record
        with pytest.raises((Fenced, KeyConflict)):  # the old incarnation records nothing
            store.write("node-1", e1, [C], [("c_total", '["a"]', 1, 1.0)], [keyed("k1", "node-1")])
        assert store.lookup_key("k1") == record
    finally:
        third.close()


@pytest.mark.g2
def test_an_expired_key_is_taken_over_by_another_node(
    store: BigtableStore, other: BigtableStore
) -> None:
    e1 = store.claim("node-1")
    e2 = other.claim("node-2")
    store.write("node-1", e1, [C], [("c_total", '["a"]', 1, 1.0)],
                [keyed("k1", "node-1", expires=time.time() - 1)])  # fmt: skip
    record = keyed("k1", "node-2")
    other.write("node-2", e2, [C], [("c_total", '["a"]', 1, 1.0)], [record])
    assert store.lookup_key("k1") == record


@pytest.mark.g2
def test_key_cells_expire_through_their_timestamps(store: BigtableStore, raw: Any) -> None:
    """A key's cells carry ``expires - KEY_GC_AGE``: the ``max_age`` rule drops
    them once the key expired (lookups check ``expires`` themselves too)."""
    e = store.claim("node-1")
    record = keyed("k1", "node-1")
    store.write("node-1", e, [C], [("c_total", '["a"]', 1, 1.0)], [record])
    expected = (int(record.expires * 1000) - KEY_GC_AGE * 1000) * 1000
    [(ts, _)] = cells(raw, b"n#node-1", "k")[b"k1"]
    [(owner_ts, _)] = cells(raw, b"o#k1", "o")[b"owner"]
    assert ts == owner_ts == expected


@pytest.mark.g2
def test_big_flushes_are_split_but_keyed_ones_refused_whole(
    store: BigtableStore, other: BigtableStore
) -> None:
    """Past ``mutations_per_request`` a flush without keys becomes several
    fenced writes; one with keys cannot be split (a key's record and its
    value land together), so its keys are answered as pending and nothing
    of it is written or taken."""
    store.mutations_per_request = 10
    e = store.claim("node-1")
    rows = [("c_total", f'["{i}"]', i, 1.0) for i in range(25)]  # 2 mutations each
    store.write("node-1", e, [C], rows)
    assert store.load("node-1").values["c_total"] == {f'["{i}"]': i for i in range(25)}

    with pytest.raises(KeyConflict) as refused:
        store.write("node-1", e, [], [("c_total", f'["x{i}"]', i, 1.0) for i in range(8)],
                    [keyed("k1", "node-1")])  # fmt: skip
    assert refused.value.pending == ["k1"]
    assert "x0" not in str(store.load("node-1").values)
    e2 = other.claim("node-2")
    other.write("node-2", e2, [C], [("c_total", '["a"]', 1, 1.0)], [keyed("k1", "node-2")])
    assert other.lookup_key("k1") is not None, "k1 was never taken by the refused flush"


# -- errors ---------------------------------------------------------------------------


@pytest.mark.g1
def test_a_paused_server_makes_writes_outcome_unknown_and_reads_unavailable(
    tmp_path: Path,
) -> None:
    """A write that runs out of time may still land (here it does, once the
    server resumes): OutcomeUnknown, never acknowledged; the next flush's
    newer timestamp wins whatever the order of landing."""
    with BigtableEmulator(tmp_path) as emulator:
        store = BigtableStore(emulator.url_for("counters"), timeout=1.0)
        try:
            e = store.claim("node-1")
            store.write("node-1", e, [C], [("c_total", '["a"]', 1, 1.0)])
            emulator.pause()
            try:
                with pytest.raises(OutcomeUnknown):
                    store.write("node-1", e, [], [("c_total", '["a"]', 7, 1.0)])
                with pytest.raises(StoreUnavailable):
                    store.load("node-1")
            finally:
                emulator.resume()
            store.write("node-1", e, [], [("c_total", '["a"]', 8, 1.0)])
            assert store.load("node-1").values["c_total"] == {'["a"]': 8}
            emulator.kill()
            with pytest.raises(StoreUnavailable):
                store.write("node-1", e, [], [("c_total", '["a"]', 9, 1.0)])
        finally:
            store.close()


@pytest.mark.g3
def test_a_registry_restores_from_bigtable(bigtable_url: str) -> None:
    """The registry on a Bigtable store: durable commits, restored values and
    created times, keyed increments counted once."""
    first: Store = BigtableStore(bigtable_url)
    reg = Registry(first, "node-1", flush_interval=None)
    hits = reg.counter("hits_total", "Hits", ["route"])
    hits.labels("/").inc(3)
    reg.commit_sync()
    created = hits.labels("/").created
    reg.close()

    again = Registry(BigtableStore(bigtable_url), "node-1", flush_interval=None)
    try:
        child = again.counter("hits_total", "Hits", ["route"]).labels("/")
        assert child.value == 3
        assert again.wait_created(30)
        assert child.created == created
    finally:
        again.close()
