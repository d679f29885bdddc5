"""The claim fence of the Cassandra store (``keepcount.stores.cassandra.fence``)
on a real 3-node cluster: late batches of an older incarnation at every
step of a newer claim, a claim that dies half-way, a damaged checkpoint,
and a restore that writes O(families) rows, not one per series.

A *late batch* is what a timed-out or paused incarnation's flush looks like
when it lands: the same single-partition batch, with that incarnation's
timestamps (``CLOCK.at(incarnation, seq)``), sent straight to Cassandra so
the test can place it exactly between two steps of a claim.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cassandra.query import BatchStatement, BatchType

from keepcount.errors import CorruptStore, Fenced
from keepcount.stores.base import FamilyDef
from keepcount.stores.cassandra import CassandraStore, fence
from keepcount.stores.cassandra.fence import CHUNK_SERIES, CLOCK, View
from keepcount.stores.lww import Claim, Clock

pytestmark = pytest.mark.g4

C = FamilyDef("c_total", "counter", "a counter", ("k",))
NODE = "node-1"

Hook = Callable[[], None]


class Steps(CassandraStore):
    """A store whose claims call ``hooks[step]`` between their steps:
    ``"read"`` before the QUORUM read (after the incarnation was raised),
    ``"checkpoint"`` after the read, ``"fence"`` after the checkpoint."""

    hooks: dict[str, Hook]

    def _view(self, node: str) -> View:
        self._call("read")
        return super()._view(node)

    def _checkpoint(self, node: str, claim: Claim, view: View) -> None:
        self._call("checkpoint")
        super()._checkpoint(node, claim, view)

    def _move_fence(self, node: str, claim: Claim, view: View) -> None:
        self._call("fence")
        super()._move_fence(node, claim, view)

    def _call(self, step: str) -> None:
        hook = getattr(self, "hooks", {}).pop(step, None)
        if hook is not None:
            hook()


@pytest.fixture
def stores(cassandra_url: str) -> Iterator[tuple[CassandraStore, Steps]]:
    old, new = CassandraStore(cassandra_url), Steps(cassandra_url)
    yield old, new
    old.close()
    new.close()


def late(store: CassandraStore, incarnation: int, seq: int, values: dict[str, int]) -> None:
    """Land a batch of incarnation ``incarnation``'s flush ``seq`` now."""
    batch = BatchStatement(BatchType.UNLOGGED)
    ts = CLOCK.at(incarnation, seq)
    for labels, value in values.items():
        batch.add(store._q.series_i, (NODE, "c_total", labels, value, ts))
    store._session.execute(batch)


def incarnation_of(store: CassandraStore) -> int:
    row = store._session.execute(store._q.node, (NODE,)).one()
    assert row is not None
    return int(row.incarnation)


def values(store: CassandraStore) -> dict[str, Any]:
    """The node's values as any reader sees them now (not a claim's cached read)."""
    return CassandraStore._view(store, NODE).snapshot().values.get("c_total", {})


A, B, Z = '["a"]', '["b"]', '["z"]'


def start(old: CassandraStore) -> int:
    """Incarnation N, acknowledged a=10, b=3; returns N."""
    e = old.claim(NODE, epoch=1)
    old.write(NODE, e, [C], [("c_total", A, 10, 1.0), ("c_total", B, 3, 1.0)])
    return incarnation_of(old)


def test_a_batch_that_landed_before_the_read_is_restored(
    stores: tuple[CassandraStore, Steps],
) -> None:
    """Between the claim's compare-and-set and its read: the batch was never
    acknowledged (in doubt), and it landed, so the new incarnation restores
    it; it is not taken back afterwards."""
    old, new = stores
    n = start(old)
    new.hooks = {"read": lambda: late(old, n, 50, {A: 12})}
    e = new.claim(NODE, epoch=2)
    assert new.load(NODE).values["c_total"] == {A: 12, B: 3}
    late(old, n, 49, {A: 11})  # an even older flush landing even later
    assert values(new) == {A: 12, B: 3}
    new.write(NODE, e, [], [("c_total", B, 4, 1.0)])
    assert values(new) == {A: 12, B: 4}


@pytest.mark.parametrize("step", ["checkpoint", "fence"])
def test_a_batch_landing_after_the_read_changes_nothing(
    stores: tuple[CassandraStore, Steps], step: str
) -> None:
    """After the read, before or after the checkpoint is written: neither a
    restored value nor a series only the late batch knows."""
    old, new = stores
    n = start(old)
    new.hooks = {step: lambda: late(old, n, 50, {A: 99, Z: 5})}
    e = new.claim(NODE, epoch=2)
    restored = new.load(NODE).values["c_total"]
    assert restored == {A: 10, B: 3}
    assert values(new) == restored, "the partition as read later, not the claim's copy"
    new.write(NODE, e, [], [("c_total", B, 4, 1.0)])
    assert values(new) == {A: 10, B: 4}


def test_batches_after_the_claim_and_after_its_first_write_change_nothing(
    stores: tuple[CassandraStore, Steps],
) -> None:
    """On a series the new incarnation has written (b) and one it has not (a)."""
    old, new = stores
    n = start(old)
    e = new.claim(NODE, epoch=2)
    late(old, n, 50, {A: 99, B: 99, Z: 5})
    assert values(new) == {A: 10, B: 3}
    new.write(NODE, e, [], [("c_total", B, 4, 1.0)])
    late(old, n, 51, {A: 100, B: 100, Z: 6})
    assert values(new) == {A: 10, B: 4}
    with pytest.raises(Fenced):  # the old handle's own write: landed, refused, ignored
        old.write(NODE, 1, [], [("c_total", A, 101, 1.0)])
    assert values(new) == {A: 10, B: 4}
    cluster = new.read_cluster()
    assert sorted((r[2], r[3]) for r in cluster.rows if r[0] == NODE) == [(A, 10), (B, 4)]
    named = new.read_cluster("c_total")
    assert sorted((r[2], r[3]) for r in named.rows if r[0] == NODE) == [(A, 10), (B, 4)]


def test_a_third_incarnation_keeps_what_the_second_restored_and_wrote(
    stores: tuple[CassandraStore, Steps], cassandra_url: str
) -> None:
    """The fence moves on with each claim: late batches of the first and the
    second incarnation change nothing the third restored."""
    old, new = stores
    n = start(old)
    e2 = new.claim(NODE, epoch=2)
    new.write(NODE, e2, [], [("c_total", B, 4, 1.0)])
    n2 = incarnation_of(new)
    third = CassandraStore(cassandra_url)
    try:
        third.claim(NODE, epoch=3)
        late(old, n, 60, {A: 99, B: 99})
        late(new, n2, 60, {A: 98, B: 98, Z: 1})
        assert values(third) == {A: 10, B: 4}
    finally:
        third.close()


def test_a_claim_that_dies_before_its_fence_leaves_the_old_one(
    stores: tuple[CassandraStore, Steps], cassandra_url: str
) -> None:
    """The dying claim served nothing: the next one reads under the old fence
    (what landed meanwhile counts as landed) and then fences both."""
    old, new = stores
    n = start(old)

    def die() -> None:
        raise RuntimeError("the claimer dies here")

    new.hooks = {"fence": die}
    with pytest.raises(RuntimeError, match="dies"):
        new.claim(NODE, epoch=2)
    late(old, n, 50, {A: 12})
    assert values(old) == {A: 12, B: 3}, "still under the first fence: the batch landed"
    third = CassandraStore(cassandra_url)
    try:
        third.claim(NODE, epoch=3)
        assert third.load(NODE).values["c_total"] == {A: 12, B: 3}
        late(old, n, 51, {A: 13})
        late(old, incarnation_of(third) - 1, 1, {A: 14})  # the dead claim's incarnation
        assert values(third) == {A: 12, B: 3}
    finally:
        third.close()


def test_a_restore_writes_a_checkpoint_not_every_series(
    stores: tuple[CassandraStore, Steps],
) -> None:
    old, new = stores
    e = old.claim(NODE, epoch=1)
    n = CHUNK_SERIES + 10
    old.write(NODE, e, [C], [("c_total", f'["{i}"]', i + 1, 1.0) for i in range(n)])
    written = list(old._session.execute(old._f.rows, (NODE,)))
    new.claim(NODE, epoch=2)
    assert new.load(NODE).series_count() == n
    after = {(r.name, r.labels): r for r in new._session.execute(new._f.rows, (NODE,))}
    untouched = [
        r for r in written if r.labels != "\x00" and after[(r.name, r.labels)].wt_ival == r.wt_ival
    ]
    assert len(untouched) == n, "no series row was written again"
    chunks = [r for r in after.values() if r.labels.startswith("\x01")]
    assert len(chunks) == 2 and all(r.parts == 2 for r in chunks)  # n series: two chunks
    assert {r.labels[1:21] for r in chunks} == {f"{incarnation_of(new):020d}"}, "old ones dropped"


def test_a_missing_or_damaged_checkpoint_chunk_is_refused(
    stores: tuple[CassandraStore, Steps], cassandra_url: str
) -> None:
    old, new = stores
    start(old)
    new.claim(NODE, epoch=2)
    chunk = next(
        r for r in new._session.execute(new._f.rows, (NODE,)) if r.labels.startswith("\x01")
    )
    ks = new.keyspace
    new._session.execute(
        f"UPDATE {ks}.node_rows SET chunk = 0xdeadbeef WHERE node = %s AND name = %s AND labels = %s",
        (NODE, chunk.name, chunk.labels),
    )
    with pytest.raises(CorruptStore, match=r"node-1.*c_total.*damaged"):
        new._view(NODE)
    new._session.execute(
        f"DELETE FROM {ks}.node_rows WHERE node = %s AND name = %s AND labels = %s",
        (NODE, chunk.name, chunk.labels),
    )
    third = CassandraStore(cassandra_url)
    try:
        with pytest.raises(CorruptStore, match=r"node-1.*0 of 1 chunks"):
            third.claim(NODE, epoch=3)
    finally:
        third.close()


def test_a_partition_without_a_fence_counts_every_cell(
    stores: tuple[CassandraStore, Steps],
) -> None:
    """A store written by format 1 (whose claims rewrote every row): no fence,
    every row counts, and the first new claim checkpoints it."""
    old, new = stores
    old.claim(NODE, epoch=1)
    ks = old.keyspace
    old._session.execute(  # a deletion wins a tie with the fence's own timestamp
        f"UPDATE {ks}.node_rows USING TIMESTAMP %s SET fence = null, parts = null WHERE node = %s",
        (CLOCK.at(1), NODE),
    )
    late(old, 1, 5, {A: 7})  # rows as format 1 left them (families too)
    old._session.execute(old._q.family, (NODE, "c_total", "\x00", "counter", "", '["k"]', None, 1))
    assert values(old) == {A: 7}
    e = new.claim(NODE, epoch=2)
    late(old, 1, 6, {A: 8})
    assert values(new) == {A: 7}
    new.write(NODE, e, [], [("c_total", A, 9, 1.0)])
    assert values(new) == {A: 9}


def test_without_the_read_rule_the_late_batches_would_show(
    stores: tuple[CassandraStore, Steps], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mutant these tests must catch: a reader that ignores the fence
    sees the late batch's values and series (so the scenarios above are
    real late writes, not writes that never landed)."""
    old, new = stores
    n = start(old)
    new.claim(NODE, epoch=2)
    late(old, n, 50, {A: 99, Z: 5})
    assert values(new) == {A: 10, B: 3}
    monkeypatch.setattr(fence, "CLOCK", Clock(seq_bits=32, scale=0))  # every fence at 0
    assert values(new) == {A: 99, B: 3, Z: 5}


def test_a_write_vouched_for_by_a_lease_skips_the_fencing_read(
    stores: tuple[CassandraStore, Steps], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One round trip per flush while a coordinator's lease is trusted
    (``Store.vouch``); the read of the incarnation again once it is not."""
    old, new = stores
    e = old.claim(NODE, epoch=1)
    trusted = [True]
    old.vouch(NODE, e, lambda: trusted[0])
    reads: list[object] = []
    real = old._exec

    def counting(query: Any, values: Any, what: str, **kw: Any) -> Any:
        if query is old._q.node:
            reads.append(values)
        return real(query, values, what, **kw)

    monkeypatch.setattr(old, "_exec", counting)
    old.write(NODE, e, [C], [("c_total", A, 1, 1.0)])
    assert reads == []
    trusted[0] = False
    old.write(NODE, e, [], [("c_total", A, 2, 1.0)])
    assert reads == [(NODE,)]
    new.claim(NODE, epoch=2)
    with pytest.raises(Fenced):
        old.write(NODE, e, [], [("c_total", A, 3, 1.0)])
    assert values(new) == {A: 2}


@pytest.mark.g5
def test_cluster_totals_read_again_only_the_partitions_that_changed(
    stores: tuple[CassandraStore, Steps],
) -> None:
    old, new = stores
    e1 = old.claim(NODE, epoch=1)
    e2 = old.claim("node-2", epoch=1)
    old.write(NODE, e1, [C], [("c_total", A, 1, 1.0)])
    old.write("node-2", e2, [C], [("c_total", A, 2, 1.0)])

    def totals(store: CassandraStore, name: str | None = None) -> list[tuple[str, str, Any]]:
        return [(n, labels, v) for n, _, labels, v in store.read_cluster(name).rows]

    assert totals(new) == [(NODE, A, 1), ("node-2", A, 2)]
    assert new._totals.reads == 2
    assert totals(new) == [(NODE, A, 1), ("node-2", A, 2)]
    assert new._totals.reads == 2, "nothing changed: no partition read again"
    old.write(NODE, e1, [], [("c_total", A, 5, 1.0)])
    assert totals(new) == [(NODE, A, 5), ("node-2", A, 2)]
    assert new._totals.reads == 3, "only the partition written since"
    n = incarnation_of(old)
    new.claim(NODE, epoch=2)  # a new fence: read again
    late(old, n, 50, {A: 99})  # a late batch of the old incarnation: below the fence
    assert totals(new) == [(NODE, A, 5), ("node-2", A, 2)]
    assert totals(new, "c_total") == [(NODE, A, 5), ("node-2", A, 2)]
    assert totals(new, "other_total") == []


_V1 = (  # format 1's tables, as keepcount before the fence created them (copied on purpose)
    "CREATE KEYSPACE {ks} WITH replication = {{'class': 'SimpleStrategy', 'replication_factor': 3}}",
    "CREATE TABLE {ks}.meta (name text PRIMARY KEY, val text)",
    "CREATE TABLE {ks}.nodes (node text PRIMARY KEY, epoch bigint, incarnation bigint, "
    "claimed_at double, released_at double, pid int, host text)",
    "CREATE TABLE {ks}.node_rows (node text, name text, labels text, ival bigint, sval text, "
    "created double, kind text, help text, labelnames text, buckets text, fingerprint text, "
    "result text, key_token text, expires double, PRIMARY KEY (node, name, labels))",
    "CREATE TABLE {ks}.key_owner (idem_key text PRIMARY KEY, node text, incarnation bigint, "
    "key_token text)",
    "INSERT INTO {ks}.meta (name, val) VALUES ('format', 'keepcount')",
    "INSERT INTO {ks}.meta (name, val) VALUES ('format_version', '1')",
    "INSERT INTO {ks}.nodes (node, epoch, incarnation, claimed_at, released_at, pid, host) "
    "VALUES ('node-1', 3, 3, 1.0, 2.0, 1, 'h')",
    "INSERT INTO {ks}.node_rows (node, name, labels, kind, help, labelnames) "
    "VALUES ('node-1', 'c_total', '\x00', 'counter', 'a counter', '[\"k\"]') USING TIMESTAMP 12884901888",
    "INSERT INTO {ks}.node_rows (node, name, labels, ival, created) "
    "VALUES ('node-1', 'c_total', '[\"a\"]', 41, 1.0) USING TIMESTAMP 12884901889",
)


def test_a_store_of_format_1_is_upgraded_when_opened(
    cassandra_up: Any, cassandra_keyspace: str, cassandra_url: str
) -> None:
    """Its values are restored exactly, and then it says format 2, so an older
    keepcount (which does not apply the fence) refuses it."""
    from cassandra_fixtures import driver_session

    with driver_session(cassandra_up) as s:
        for statement in _V1:
            s.execute(statement.format(ks=cassandra_keyspace))
    store = CassandraStore(cassandra_url)
    try:
        e = store.claim(NODE)
        assert store.load(NODE).values == {"c_total": {A: 41}}
        store.write(NODE, e, [], [("c_total", A, 42, 1.0)])
        assert values(store) == {A: 42}
        meta = dict(store._session.execute(f"SELECT name, val FROM {cassandra_keyspace}.meta"))
        assert meta["format_version"] == "2"
    finally:
        store.close()
