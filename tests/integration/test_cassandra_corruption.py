"""A flipped byte in one Cassandra replica's SSTable: a node's restore still
returns every acknowledged value, never a smaller one.

keepcount's tables are compressed in chunks, each with a CRC that every read
checks (``crc_check_chance`` 1.0, ``stores.cassandra.session``): the replica
with the flipped byte refuses the chunk (``CorruptSSTableException``) rather
than serving what it decodes, and QUORUM reads go on with the other two.  (Cassandra 5.0.9 reports it as a NullPointerException
in the handler of the CRC's IOException, not as ``CorruptSSTableException``,
so ``disk_failure_policy: stop_paranoid`` does not take the replica out;
the read fails all the same.)  A QUORUM read that asks only two replicas
fails when one of them fails, so ``node_rows`` reads ask all three
(``speculative_retry = 'ALWAYS'``) and two answers suffice: without it every
restore of the node here was refused (85 in 60 s), never wrong.
"""

from __future__ import annotations

import time

import pytest

from cassandra_fixtures import driver_session
from keepcount.cluster.cassandra import CassandraCluster
from keepcount.cluster.corrupt import flip_sstables
from keepcount.errors import StoreUnavailable
from keepcount.stores import open_store
from keepcount.stores.base import FamilyDef

pytestmark = [pytest.mark.slow, pytest.mark.g3]

VICTIM = 2
NODE = "node-1"
C = FamilyDef("c_total", "counter", "", ("k",))
LOADS = 5
VALUES = {f'["s{i:03d}"]': 1_000_000 + 7 * i for i in range(200)}


def flip(cluster: CassandraCluster, keyspace: str) -> None:
    """Replica ``VICTIM`` flushed, killed, a bit of each of its node_rows
    SSTables of ``keyspace`` flipped, restarted.  Nothing to put back: the
    keyspace (and so the flipped files) is dropped after the test."""
    cluster.nodetool(VICTIM, "flush", keyspace)
    cluster.kill(VICTIM)
    data = cluster.nodes[VICTIM].home_dir / "data"
    flips = flip_sstables(data, keyspace, "node_rows")
    try:
        assert flips, "the flush wrote SSTables"
        for path, _ in flips:  # compressed, so every chunk carries a CRC
            assert path.with_name(path.name.replace("Data.db", "CompressionInfo.db")).exists()
    finally:
        cluster.restart(VICTIM)


def test_a_flipped_sstable_byte_on_one_replica_never_makes_a_value_go_backwards(
    cassandra_up: CassandraCluster, cassandra_keyspace: str
) -> None:
    url = cassandra_up.url_for(cassandra_keyspace)
    store = open_store(url)
    try:
        epoch = store.claim(NODE)
        store.write(NODE, epoch, [C], [("c_total", k, v, 1.0) for k, v in VALUES.items()])
    finally:
        store.close()
    log = cassandra_up.nodes[VICTIM].log
    before = log.stat().st_size
    flip(cassandra_up, cassandra_keyspace)
    # The replica itself refuses the chunk: a read it serves alone fails.
    from cassandra import ConsistencyLevel, OperationTimedOut, ReadFailure
    from cassandra.cluster import NoHostAvailable
    from cassandra.query import SimpleStatement

    one = SimpleStatement(
        f"SELECT labels, ival FROM {cassandra_keyspace}.node_rows WHERE node = %s",
        consistency_level=ConsistencyLevel.ONE,
    )
    failures = 0
    with driver_session(cassandra_up, VICTIM) as session:
        for _ in range(5):
            try:
                rows = {r.labels: r.ival for r in session.execute(one, (NODE,))}
            except (ReadFailure, NoHostAvailable, OperationTimedOut):
                failures += 1  # refused, or its transports already stopped
            else:  # served by another replica: whole and right
                assert {k: rows[k] for k in VALUES} == VALUES
    # A node's restore: refused (StoreUnavailable, which a starting node
    # retries) while the replica still answers, then whole, never less.
    loads, refused = 0, []
    deadline = time.monotonic() + 120
    again = open_store(url)
    try:
        while loads < LOADS and time.monotonic() < deadline:
            try:
                values = again.load(NODE).values["c_total"]
            except StoreUnavailable as exc:
                refused.append(str(exc).split(": ", 2)[-1][:200])
                time.sleep(0.5)
                continue
            assert values == VALUES, "a restore returned other values than acknowledged"
            loads += 1
    finally:
        again.close()
    assert loads == LOADS, f"{len(refused)} restores refused, {loads} whole: {refused}"
    with log.open("rb") as f:
        f.seek(before)
        seen = f.read()
    # The chunk's CRC fails (an IOException); Cassandra 5.0.9's handler
    # of it then fails itself (a NullPointerException in
    # AbstractSSTableIterator), so the read fails rather than serve.
    assert b"Exception in thread Thread[ReadStage" in seen, "the replica refused its chunk"
    print(f"\nreads at ONE through the flipped replica that failed: {failures} of 5; "
          f"restores refused: {len(refused)} {refused[:3]}")  # fmt: skip
