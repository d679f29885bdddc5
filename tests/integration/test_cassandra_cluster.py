"""CassandraCluster against real Cassandra processes: start, views, faults.

One 3-node cluster per session (``cassandra_fixtures``); destructive tests
leave it all UP again (and the ``cassandra_up`` fixture restores it if they
fail half-way).  Coordinator of every driver request: node 0, which no test
harms, so each answer is that node's view.  The module takes ~1 min on 2
cores, most of it Cassandra starting and its failure detector convicting.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cassandra import ConsistencyLevel, Unavailable
from cassandra.cluster import Session
from cassandra.query import SimpleStatement

import cassandra_fixtures
from cassandra_fixtures import driver_session
from keepcount.cluster.cassandra import (
    CassandraCluster,
    CqlConnection,
    cassandra_home,
)
from keepcount.cluster.cassandra_config import WRITE_REQUEST_TIMEOUT
from keepcount.cluster.processes import process_state
from keepcount.cluster.supervisor import answer_timeout


def make_table(cluster: CassandraCluster, keyspace: str) -> None:
    with driver_session(cluster) as s:
        s.execute(
            f"CREATE KEYSPACE {keyspace} WITH replication = "
            "{'class': 'SimpleStrategy', 'replication_factor': 3}"
        )
        s.execute(f"CREATE TABLE {keyspace}.kv (k text PRIMARY KEY, v bigint)")


def write(
    s: Session, keyspace: str, key: str, value: int, cl: int = ConsistencyLevel.QUORUM
) -> None:
    stmt = SimpleStatement(
        f"INSERT INTO {keyspace}.kv (k, v) VALUES (%s, %s)", consistency_level=cl
    )
    s.execute(stmt, (key, value))


# -- without servers --------------------------------------------------------------


def test_a_missing_install_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"scripts/get-cassandra\.sh"):
        cassandra_home(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"scripts/get-cassandra\.sh"):
        CassandraCluster(tmp_path / "c", home=tmp_path)


@pytest.mark.g1
def test_config_is_durable_and_tokens_split_the_ring(tmp_path: Path) -> None:
    cassandra_fixtures.require_cassandra()
    cluster = CassandraCluster(tmp_path, nodes=3, ports=(19042, 17000))
    assert cluster.hosts == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    assert cluster.url_for("ks") == "cassandra://127.0.0.1:19042,127.0.0.2:19042,127.0.0.3:19042/ks"
    assert cluster.url_for("ks", first=2).startswith("cassandra://127.0.0.3:19042,127.0.0.1")
    assert cluster.contact_points[1] == ("127.0.0.2", 19042)
    tokens = [n.token for n in cluster.nodes]
    assert tokens[0] == -(2**63) and tokens == sorted(tokens)
    assert tokens[1] - tokens[0] == tokens[2] - tokens[1] == 2**64 // 3
    node = cluster.nodes[1]
    node.write_config(cluster.settings)
    yaml = (node.conf_dir / "cassandra.yaml").read_text()
    assert "commitlog_sync: batch\n" in yaml and "periodic" not in yaml
    assert "paxos_variant: v2\n" in yaml and "write_request_timeout: 2000ms\n" in yaml
    # The balancer in front of keepcount nodes outwaits the store's write timeout.
    assert answer_timeout(cluster.url_for("ks")) > WRITE_REQUEST_TIMEOUT == 2.0
    assert answer_timeout("cassandra") > WRITE_REQUEST_TIMEOUT
    assert answer_timeout(f"sqlite:///{tmp_path}/c.db") == 1.0
    assert "listen_address: 127.0.0.2\n" in yaml and "rpc_address: 127.0.0.2\n" in yaml
    assert f"'{tmp_path / 'node1' / 'commitlog'}'" in yaml
    group = CassandraCluster(tmp_path / "g", nodes=1, commitlog_sync="group")
    group.nodes[0].write_config(group.settings)
    assert (
        "commitlog_sync: group\ncommitlog_sync_group_window: 2ms\n"
        in (group.nodes[0].conf_dir / "cassandra.yaml").read_text()
    )
    assert CassandraCluster(tmp_path / "d", nodes=1, ports=(9042, 7000)).url_for("k") == (
        "cassandra://127.0.0.1/k"
    )
    with pytest.raises(ValueError, match="periodic"):
        CassandraCluster(tmp_path / "p", commitlog_sync="periodic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1 to 3 nodes"):
        CassandraCluster(tmp_path / "n", nodes=4)


# -- the session's 3-node cluster -------------------------------------------------


def test_every_node_sees_all_three_up(cassandra_up: CassandraCluster) -> None:
    for i, node in enumerate(cassandra_up.nodes):
        assert cassandra_up.alive_seen_by(i) == 3
        with node.connect() as cql:
            local = cql.query("SELECT listen_address, release_version FROM system.local")
            peers = cql.query("SELECT peer, native_port FROM system.peers_v2")
            sync = cql.query(
                "SELECT value FROM system_views.settings WHERE name = 'commitlog_sync'"
            )
            # v1 stalled keyed increments for seconds after a replica's kill
            # (docs/stores.md, "Paxos v2"; test_cassandra_replica_kill.py).
            paxos = cql.query(
                "SELECT value FROM system_views.settings WHERE name = 'paxos_variant'"
            )
        assert local[0]["listen_address"] == node.host
        assert str(local[0]["release_version"]).startswith("5.0.")
        assert {p["peer"] for p in peers} == set(cassandra_up.hosts) - {node.host}
        assert {p["native_port"] for p in peers} == {cassandra_up.port}
        assert sync == [{"value": "batch"}]
        assert paxos == [{"value": "v2"}]
    # Cassandra's own tool agrees: Up and Normal, all three.
    status = cassandra_up.nodetool(2, "status")
    assert sorted(line.split()[1] for line in status.splitlines() if line.startswith("UN ")) == (
        cassandra_up.hosts
    )


@pytest.mark.g1
@pytest.mark.slow
def test_quorum_survives_one_kill_is_unavailable_with_two_and_returns_after_restart(
    cassandra_up: CassandraCluster, cassandra_keyspace: str
) -> None:
    ks = cassandra_keyspace
    make_table(cassandra_up, ks)
    with driver_session(cassandra_up, coordinator=0) as s:
        write(s, ks, "a", 1)
        killed = cassandra_up.nodes[2].pid
        cassandra_up.kill(2)
        assert process_state(killed) is None
        write(s, ks, "b", 2)  # 2 of 3 replicas: QUORUM holds

        cassandra_up.kill(1)
        started = time.monotonic()
        cassandra_up.wait_down(1)
        print(f"two nodes DOWN as seen by node 0 after {time.monotonic() - started:.1f} s")
        assert cassandra_up.alive_seen_by(0) == 1
        with pytest.raises(Unavailable) as refused:
            write(s, ks, "c", 3)
        assert (refused.value.required_replicas, refused.value.alive_replicas) == (2, 1)

        before = cassandra_up.nodes[1].pid
        cassandra_up.restart(1)
        assert cassandra_up.nodes[1].pid != before
        write(s, ks, "c", 3)
        rows = s.execute(
            SimpleStatement(f"SELECT k, v FROM {ks}.kv", consistency_level=ConsistencyLevel.QUORUM)
        )
        assert sorted((r.k, r.v) for r in rows) == [("a", 1), ("b", 2), ("c", 3)]

        cassandra_up.start()  # node 2 back: all three UP again
        assert cassandra_up.live() == [0, 1, 2]
        # UP in gossip (what start() awaits) comes before the restarted node
        # answers a CL ALL probe in time (None: a replica held alive did not
        # answer within the probe's timeout): await the answer, bounded.
        deadline = time.monotonic() + 60
        seen = [cassandra_up.alive_seen_by(i) for i in range(3)]
        while seen != [3, 3, 3] and time.monotonic() < deadline:
            time.sleep(0.2)  # poll interval
            seen = [cassandra_up.alive_seen_by(i) for i in range(3)]
        assert seen == [3, 3, 3]
        write(s, ks, "d", 4, ConsistencyLevel.ALL)


@pytest.mark.slow
def test_pause_stops_a_node_and_resume_brings_it_back(
    cassandra_up: CassandraCluster, cassandra_keyspace: str
) -> None:
    ks = cassandra_keyspace
    make_table(cassandra_up, ks)
    node = cassandra_up.nodes[1]
    with driver_session(cassandra_up, coordinator=0) as s:
        cassandra_up.pause(1)
        assert process_state(node.pid) == "T"
        assert cassandra_up.live() == [0, 2]
        assert not node.answers(timeout=1.0)
        write(s, ks, "while-paused", 1)  # nodes 0 and 2 make the quorum

        cassandra_up.resume(1)
        assert process_state(node.pid) not in ("T", None)
        cassandra_up.wait_up(60)
        assert node.answers()
        write(s, ks, "after-resume", 2, ConsistencyLevel.ALL)


# -- a one-node cluster ------------------------------------------------------------


def test_a_one_node_cluster_starts_answers_and_stops(tmp_path: Path) -> None:
    cassandra_fixtures.require_cassandra()
    cluster = CassandraCluster(tmp_path, nodes=1)
    try:
        cluster.start()
        print(f"one node UP in {cluster.start_seconds:.1f} s")
        assert cluster.url_for("ks") == f"cassandra://127.0.0.1:{cluster.port}/ks"
        assert cluster.alive_seen_by(0) == 1
        with CqlConnection("127.0.0.1", cluster.port, timeout=30) as cql:
            assert cql.query("SELECT peer FROM system.peers_v2") == []
            cql.query(
                "CREATE KEYSPACE again WITH replication = "
                "{'class': 'SimpleStrategy', 'replication_factor': 1}"
            )
            cql.query("CREATE TABLE again.t (k int PRIMARY KEY, v int)")
            cql.query("INSERT INTO again.t (k, v) VALUES (1, 42)")
        pid = cluster.nodes[0].pid
    finally:
        print(cluster.logs(2000))
        cluster.stop()
    assert process_state(pid) is None
    assert (tmp_path / "node0" / "commitlog").is_dir()
    assert (tmp_path / "node0" / "logs" / "cassandra.log").stat().st_size > 0

    # The same directory starts again as the same cluster (`keepcount cluster
    # up` twice in one --dir): same name and ports, the data still there.
    again = CassandraCluster(tmp_path, nodes=1)
    assert (again.settings.cluster_name, again.port) == (cluster.settings.cluster_name,
                                                         cluster.port)  # fmt: skip
    try:
        again.start()
        with CqlConnection("127.0.0.1", again.port, timeout=30) as cql:
            assert cql.query("SELECT v FROM again.t WHERE k = 1") == [{"v": 42}]
    finally:
        print(again.logs(2000))
        again.stop()
    with pytest.raises(ValueError, match="with nodes 1, not 3"):
        CassandraCluster(tmp_path, nodes=3)
    (tmp_path / "keepcount-cassandra.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        CassandraCluster(tmp_path, nodes=1)
