"""Whole clusters on real processes: nodes, HAProxy or NGINX, etcd or ZooKeeper, SQLite.

A supervisor (``keepcount.cluster.supervisor``) runs in the test's event
loop, as in ``keepcount demo``; keyed increments go through the load
balancer from clients that tally every acknowledgement and retry every
unanswered increment with its key (``KeyedLoad``).  Faults are real signals
to real processes.  Each test ends by holding the clients' tally against the
cluster's totals: equal, or an acknowledged increment was lost (or counted
twice).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from clusters import running, wait_for

from keepcount.cluster.faults import pause
from keepcount.cluster.supervisor import Incarnation, Supervisor, process_state
from keepcount.cluster.workload import KeyedLoad, labels_key

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

NAME = "orders_total"
LABELS = [{"shop": s} for s in ("a", "b", "c")]
KILLS = int(os.environ.get("KEEPCOUNT_CLUSTER_KILLS", "4"))


async def totals(session: aiohttp.ClientSession, url: str) -> dict[str, int]:
    async with session.get(f"{url}/v1/cluster/counters/{NAME}") as r:
        if r.status == 404:
            return {}
        body = await r.json()
        assert r.status == 200, body
    return {labels_key(c["labels"]): c["value"] for c in body["counters"]}


def node_ready_again(sup: Supervisor, node: str, before: int) -> Callable[[], bool]:
    ns = sup.nodes[node]
    return lambda: ns.incarnations > before and ns.current is not None and ns.current.ready


async def load_with_faults(
    sup: Supervisor, faults: Callable[[KeyedLoad], Any], *, clients: int = 12
) -> KeyedLoad:
    """Run keyed load while ``faults(load)`` runs; check tally == totals; return the load."""
    load = KeyedLoad(sup.spec.lb_url, NAME, LABELS, clients=clients, seed=7)
    stop = asyncio.Event()
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(load.run(session, stop))
        try:
            await wait_for(lambda: sum(load.acked.values()) >= 50, 30, "first acknowledgements")
            await faults(load)
            await asyncio.sleep(0.5)  # a little load after the last fault
        finally:
            stop.set()
            await asyncio.wait_for(task, 120)
        final = await totals(session, sup.spec.lb_url)
    assert final == load.tally(), "cluster totals == acknowledged increments, per label set"
    assert sum(final.values()) > 0
    return load


@pytest.mark.g1
@pytest.mark.parametrize("lb", ["haproxy", "nginx"])
def test_sigkilled_nodes_lose_nothing_and_keyed_clients_see_no_error(
    tmp_path: Path, lb: str
) -> None:
    asyncio.run(_sigkills(tmp_path, lb))


async def _sigkills(tmp_path: Path, lb: str) -> None:
    async with running(tmp_path, lb=lb) as sup:
        names = [n.id for n in sup.spec.nodes]
        ready_after: list[float] = []

        async def faults(load: KeyedLoad) -> None:
            for i in range(KILLS):
                node = names[i % len(names)]
                before = sup.nodes[node].incarnations
                await sup.signal(node, "KILL")
                ready_after.append(
                    await wait_for(node_ready_again(sup, node, before), 60, f"{node} back")
                )
                # NGINX takes a failed server out for fail_timeout (1 s) and
                # has no health check to bring it back sooner: let it.
                await asyncio.sleep(1.5)

        load = await load_with_faults(sup, faults)
        assert sum(load.errors.values()) == 0, f"keyed requests saw errors: {dict(load.errors)}"
        assert all(sup.nodes[n].restarts >= 1 for n in names[: min(KILLS, len(names))])
        print(f"{lb}: kill -> ready again {ready_after}; {load.ops} ops, {load.retries} retries")


@pytest.mark.g4
def test_a_zombie_acknowledges_nothing_and_its_late_writes_do_not_win(tmp_path: Path) -> None:
    """SIGSTOP a node past its claim's TTL under load; the detector starts a
    new incarnation on the other slot; requests sent straight to the paused
    process wait in its socket; SIGCONT: not one of them is acknowledged, the
    old process stops by itself (exit 3), and the totals equal the tally
    (a late write of the old epoch would have put an older value last)."""
    asyncio.run(_zombie(tmp_path))


async def _zombie(tmp_path: Path) -> None:
    async with running(tmp_path) as sup:
        node = sup.spec.nodes[1].id
        ns = sup.nodes[node]
        zombie_answers: list[int] = []

        async def direct(url: str, i: int) -> None:
            body = {"labels": {"shop": "zombie"}, "by": 1}
            headers = {"Idempotency-Key": f"zombie-{i}"}
            try:
                async with aiohttp.ClientSession() as s, s.post(
                    f"{url}/v1/counters/{NAME}/increment", json=body, headers=headers,
                    timeout=aiohttp.ClientTimeout(total=20),
                ) as r:  # fmt: skip
                    zombie_answers.append(r.status)
            except (aiohttp.ClientError, TimeoutError):
                zombie_answers.append(0)

        sent: list[asyncio.Task[None]] = []

        async def replaced(old: Incarnation) -> None:
            # The detector gave up on the paused process and its replacement
            # serves from the other slot; requests sent straight to the old
            # one wait in its socket until it is continued.
            assert ns.current is not None and ns.current.slot != old.slot
            assert process_state(old.pid) == "T"
            sent.extend(asyncio.create_task(direct(old.process.url, i)) for i in range(5))
            await asyncio.sleep(0.3)  # they reach the paused process's socket

        async def faults(load: KeyedLoad) -> None:
            fault = await pause(sup, node, on_replaced=replaced)
            await asyncio.gather(*sent)
            assert fault.zombie_exit == 3, "it stopped because it lost its claim"

        await load_with_faults(sup, faults)
        assert len(zombie_answers) == 5 and 200 not in zombie_answers, zombie_answers
        async with aiohttp.ClientSession() as session:
            final = await totals(session, sup.spec.lb_url)
        assert labels_key({"shop": "zombie"}) not in final, "the zombie counted nothing"


@pytest.mark.g4
def test_etcd_faults_one_member_then_all(tmp_path: Path) -> None:
    """One etcd member killed: the cluster goes on, no client error.  Every
    member killed: nodes stop acknowledging (503s, nothing acknowledged);
    members restarted: the nodes serve again, and nothing was lost."""
    asyncio.run(_etcd_faults(tmp_path))


async def _etcd_faults(tmp_path: Path) -> None:
    async with running(tmp_path) as sup:
        servers = sup.servers
        ttl = sup.spec.claim_ttl
        seen: dict[str, int] = {}

        async def faults(load: KeyedLoad) -> None:
            await asyncio.to_thread(servers.kill, 0)
            before = sum(load.acked.values())
            await asyncio.sleep(3 * ttl)  # longer than any claim's TTL
            seen["acked_with_one_member_down"] = sum(load.acked.values()) - before
            seen["errors_with_one_member_down"] = sum(load.errors.values())
            await asyncio.to_thread(servers.restart, 0)
            for i in (1, 2, 0):
                await asyncio.to_thread(servers.kill, i)
            await wait_for(
                lambda: all(not (ns.current and ns.current.ready) for ns in sup.nodes.values()),
                3 * ttl + 5, "nodes stop serving without their coordinator",
            )  # fmt: skip
            seen["errors_without_etcd"] = sum(load.errors.values())
            # All at once: one member alone has no quorum to be healthy with.
            await asyncio.gather(*(asyncio.to_thread(servers.restart, i) for i in (0, 1, 2)))
            await wait_for(
                lambda: all(ns.current and ns.current.ready for ns in sup.nodes.values()),
                90, "nodes serve again once etcd is back",
            )  # fmt: skip

        await load_with_faults(sup, faults)
        assert seen["acked_with_one_member_down"] > 0, "acknowledgements went on with 2 of 3 up"
        assert seen["errors_with_one_member_down"] == 0, seen
        assert seen["errors_without_etcd"] > 0, "without etcd the clients were refused"


def keepcount(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "keepcount.cli", *args],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_cluster_cli_up_status_kill_restart_down(tmp_path: Path) -> None:
    d = str(tmp_path / "c")
    up = keepcount("cluster", "up", "--nodes", "2", "--dir", d, "--port", "0",
                   "--coordinator", "zookeeper", "--lb", "nginx")  # fmt: skip
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        doc = json.loads(keepcount("cluster", "status", "--dir", d, "--json").stdout)
        assert [n["state"] for n in doc["nodes"]] == ["ready", "ready"]
        first = {n["id"]: n["pid"] for n in doc["nodes"]}
        killed = keepcount("cluster", "kill", "node-1", "--dir", d)
        assert killed.returncode == 0, killed.stderr
        restarted = keepcount("cluster", "restart", "node-2", "--dir", d)
        assert restarted.returncode == 0, restarted.stderr
        deadline = time.monotonic() + 60
        while True:
            doc = json.loads(keepcount("cluster", "status", "--dir", d, "--json").stdout)
            if all(n["state"] == "ready" for n in doc["nodes"]):
                break
            assert time.monotonic() < deadline, doc
            time.sleep(0.1)
        assert all(n["pid"] != first[n["id"]] and n["restarts"] == 1 for n in doc["nodes"]), doc
        bad = keepcount("cluster", "kill", "node-9", "--dir", d)
        assert bad.returncode != 0 and "node-9" in bad.stderr
    finally:
        down = keepcount("cluster", "down", "--dir", d)
    assert down.returncode == 0, down.stderr
    gone = keepcount("cluster", "status", "--dir", d)
    assert gone.returncode != 0 and "does not answer" in gone.stderr
    for n in doc["nodes"]:
        assert process_state(n["pid"]) is None, f"{n['id']} still runs after down"


@pytest.mark.g3
def test_a_cluster_directory_starts_again_with_its_counters_and_epochs(tmp_path: Path) -> None:
    """`cluster up` after `cluster down` in the same --dir: etcd comes back
    on the ports its data was saved with (claims' epochs keep growing, so
    the store does not fence the new nodes), the counters are all there."""
    import urllib.request

    d = str(tmp_path / "c")

    def status() -> dict[str, Any]:
        out = keepcount("cluster", "status", "--dir", d, "--json")
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout))

    def post(url: str) -> None:
        req = urllib.request.Request(
            f"{url}/v1/counters/again_total/increment", data=b"{}", method="POST",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200

    epochs: list[dict[str, int]] = []
    for run in range(2):
        up = keepcount("cluster", "up", "--nodes", "2", "--dir", d, "--port", "0")
        try:
            assert up.returncode == 0, f"run {run}: {up.stdout}{up.stderr}"
            doc = status()
            epochs.append({n["id"]: n["epoch"] for n in doc["nodes"]})
            for _ in range(3):
                post(doc["lb"]["url"])
            with urllib.request.urlopen(
                f"{doc['lb']['url']}/v1/cluster/counters/again_total", timeout=10
            ) as resp:
                total = json.loads(resp.read())["counters"][0]["value"]
            assert total == 3 * (run + 1), f"run {run}: the counters of the first run are kept"
        finally:
            down = keepcount("cluster", "down", "--dir", d)
            assert down.returncode == 0, down.stderr
    assert min(epochs[1].values()) > max(epochs[0].values()), epochs
