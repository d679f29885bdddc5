"""keepcount nodes on a real 3-node Apache Cassandra cluster (RF=3, QUORUM),
replicas killed under load.

A supervised keepcount cluster (3 nodes, HAProxy, etcd) stores its counters
in a fresh keyspace of the session's Cassandra cluster; clients send keyed
increments through HAProxy and tally every acknowledgement.  Cassandra nodes
are SIGKILLed and restarted for real.  In the end the tally must equal the
cluster's totals: nothing acknowledged was lost, nothing counted twice.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from clusters import running, wait_for

from keepcount.cluster.cassandra import CassandraCluster
from keepcount.cluster.faults import kill
from keepcount.cluster.workload import KeyedLoad, labels_key

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.g1]

NAME = "orders_total"
LABELS = [{"shop": s} for s in ("a", "b", "c")]


def acked(load: KeyedLoad) -> int:
    return sum(load.acked.values())


async def totals(url: str) -> dict[str, int]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/v1/cluster/counters/{NAME}") as r,
    ):
        body = await r.json()
        assert r.status == 200, body
    return {labels_key(c["labels"]): c["value"] for c in body["counters"]}


def test_replicas_killed_under_load(
    tmp_path: Path, cassandra_up: CassandraCluster, cassandra_url: str
) -> None:
    """One replica down: increments go on being acknowledged (QUORUM = 2 of 3).
    Two down: refused (503, nothing acknowledged).  One back: acknowledged
    again.  A keepcount node killed while a replica is down restores its
    values (QUORUM read) before it serves.  Nothing lost, nothing doubled."""
    asyncio.run(_replicas(tmp_path, cassandra_up, cassandra_url))


async def _replicas(tmp_path: Path, cassandra: CassandraCluster, url: str) -> None:
    seen: dict[str, float] = {}
    async with running(tmp_path, nodes=3, store=url) as sup:
        load = KeyedLoad(sup.spec.lb_url, NAME, LABELS, clients=8, seed=5)
        stop = asyncio.Event()
        async with aiohttp.ClientSession() as session:
            task = asyncio.create_task(load.run(session, stop))
            try:
                await wait_for(lambda: acked(load) >= 100, 60, "first acknowledgements")

                # One replica down: QUORUM still reached.
                await asyncio.to_thread(cassandra.kill, 2)
                before = acked(load)
                await wait_for(lambda: acked(load) >= before + 300, 60,
                               "acknowledgements with 2 of 3 replicas")  # fmt: skip

                # A keepcount node killed now restores at QUORUM from 2 replicas.
                node = sup.spec.nodes[0].id
                fault = await kill(sup, node)
                seen["restore_with_a_replica_down"] = fault.ready or 0.0
                restored = sup.nodes[node].current
                assert restored is not None and restored.readyz["restored_series"] >= 1

                # Two replicas down: nothing is acknowledged.
                await asyncio.to_thread(cassandra.kill, 1)
                errors = sum(load.errors.values())
                await wait_for(lambda: sum(load.errors.values()) >= errors + 20, 60,
                               "refusals with 1 of 3 replicas")  # fmt: skip
                frozen = acked(load)
                await asyncio.sleep(2.0)  # a window in which nothing may be acknowledged
                assert acked(load) == frozen, "acknowledged with only 1 of 3 replicas up"

                # One replica back: acknowledged again.
                await asyncio.to_thread(cassandra.restart, 1)
                await wait_for(lambda: acked(load) >= frozen + 100, 90,
                               "acknowledgements once 2 of 3 are back")  # fmt: skip
                await asyncio.to_thread(cassandra.restart, 2)
                await wait_for(lambda: acked(load) >= frozen + 300, 90, "all 3 back")
            finally:
                stop.set()
                await asyncio.wait_for(task, 120)
        final = await totals(sup.spec.lb_url)
    assert final == load.tally(), "every acknowledged increment, each once"
    print(f"\nrestore with a replica down: {seen}; ops {load.ops}, errors {dict(load.errors)}")
