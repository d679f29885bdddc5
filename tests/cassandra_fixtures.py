"""Fixtures for tests against a real Apache Cassandra cluster.

``cassandra_cluster``: 3 nodes on 127.0.0.1-3, started once per session
(~15 s on 2 cores) and SIGKILLed at the end.  A test takes it through
``cassandra_up`` (the same cluster, with the nodes' log tails printed at
teardown, which pytest shows only for a failing test, and every node
brought back UP if the test killed or paused one), or through
``cassandra_keyspace`` / ``cassandra_url`` (a fresh, uuid-named keyspace
that the code under test creates itself; dropped afterwards).  (No fixture
is called ``cassandra``: that is the driver's package.)

A missing install fails the test (never skips) with the command that
installs it.  A test module takes the fixtures by assigning them to
module-level names (``cassandra_up = cassandra_fixtures.cassandra_up``); to share
one cluster between modules, import them into ``conftest.py`` instead (each
module that defines a session fixture gets an instance of its own).

``driver_session`` opens a ``cassandra-driver`` session whose requests are
all coordinated by one chosen node, so a test can kill or pause the others
and know which node answered.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pytest

from keepcount.cluster.cassandra import CassandraCluster, cassandra_home

if TYPE_CHECKING:
    from cassandra.cluster import Session


def require_cassandra() -> None:
    """Fail (never skip) with the install command if Cassandra is missing."""
    try:
        cassandra_home()
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)


def restore(cluster: CassandraCluster) -> None:
    """Resume paused nodes, start killed ones; return once all are UP."""
    for i, node in enumerate(cluster.nodes):
        if node.running() and not node.live():
            cluster.resume(i)
    cluster.start()


@pytest.fixture(scope="session")
def cassandra_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CassandraCluster]:
    require_cassandra()
    cluster = CassandraCluster(tmp_path_factory.mktemp("cassandra"), nodes=3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cassandra_up(cassandra_cluster: CassandraCluster) -> Iterator[CassandraCluster]:
    """The session's cluster for one test; all nodes UP again afterwards."""
    yield cassandra_cluster
    print(f"\n=== Cassandra logs (tail) ===\n{cassandra_cluster.logs(2000)}")
    restore(cassandra_cluster)


@pytest.fixture
def cassandra_keyspace(cassandra_up: CassandraCluster) -> Iterator[str]:
    """A keyspace name no other test uses (the store creates the keyspace);
    dropped at teardown if it was created."""
    name = f"keepcount_{uuid.uuid4().hex[:16]}"
    yield name
    with cassandra_up.nodes[cassandra_up.live()[0]].connect(timeout=30) as cql:
        cql.query(f"DROP KEYSPACE IF EXISTS {name}")


@pytest.fixture
def cassandra_url(cassandra_up: CassandraCluster, cassandra_keyspace: str) -> str:
    """``cassandra://127.0.0.1:P,127.0.0.2:P,127.0.0.3:P/<fresh keyspace>``."""
    return cassandra_up.url_for(cassandra_keyspace)


@contextmanager
def driver_session(
    cluster: CassandraCluster, coordinator: int = 0, keyspace: str | None = None
) -> Iterator[Session]:
    """A ``cassandra-driver`` session that sends every request to node
    ``coordinator`` (consistency QUORUM by default, no retries: a test sees
    the coordinator's own answer, e.g. ``Unavailable``).  libev is the
    driver's reactor: its C extension ships in the wheel, and the asyncore
    fallback warns (and is gone) on current Pythons."""
    from cassandra import ConsistencyLevel
    from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile
    from cassandra.io.libevreactor import LibevConnection
    from cassandra.policies import FallthroughRetryPolicy, WhiteListRoundRobinPolicy

    host = cluster.hosts[coordinator]
    profile = ExecutionProfile(
        load_balancing_policy=WhiteListRoundRobinPolicy([host]),
        retry_policy=FallthroughRetryPolicy(),
        consistency_level=ConsistencyLevel.QUORUM,
        request_timeout=20,
    )
    client = Cluster(
        contact_points=[(host, cluster.port)],
        execution_profiles={EXEC_PROFILE_DEFAULT: profile},
        protocol_version=5,
        connection_class=LibevConnection,
        connect_timeout=10,
        control_connection_timeout=10,
    )
    try:
        yield client.connect(keyspace)
    finally:
        client.shutdown()
