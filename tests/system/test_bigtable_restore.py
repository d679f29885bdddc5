"""``keepcount node`` on the Bigtable emulator, SIGKILLed under concurrent
HTTP increments several times and restarted.

Every increment carries an ``Idempotency-Key``.  After every restart the
node's value lies between what the clients were acknowledged (200) and what
they attempted, and never goes backwards; the requests that got no answer
(the kill broke their connection, or a 503) are retried on the restarted
node, so in the end the value equals the sum of every request exactly:
nothing acknowledged lost, nothing counted twice.  A killed incarnation may
have taken a key without recording it: its restarted successor takes the
key over (the claim fenced the old incarnation's flush).

The node claims its id through a one-member etcd (``--coordinator``): a
killed node never releases its store claim, and only a coordinator's epoch
lets the next incarnation take over.  The emulator keeps data in memory
only, so this test kills keepcount nodes, never the emulator.

``KEEPCOUNT_BIGTABLE_KILLS`` sets the number of kills (default 4).
"""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from keepcount.cluster.etcd import EtcdCluster, etcd_binary
from keepcount.nodeproc import NodeProcess, free_port

KILLS = int(os.environ.get("KEEPCOUNT_BIGTABLE_KILLS", "4"))
CLIENTS = 8
NAME = "orders_total"
pytestmark = [pytest.mark.crash, pytest.mark.slow, pytest.mark.g1]


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    try:
        etcd_binary()
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)
    cluster = EtcdCluster(tmp_path / "etcd", members=1)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@dataclass
class Op:
    worker: str
    by: int
    key: str
    acked: bool = False
    tries: int = 0


async def send(session: aiohttp.ClientSession, node: NodeProcess, op: Op) -> bool:
    """One attempt; True once acknowledged.  Any other outcome leaves it unknown."""
    op.tries += 1
    try:
        async with session.post(
            f"{node.url}/v1/counters/{NAME}/increment",
            json={"labels": {"worker": op.worker}, "by": op.by},
            headers={"Idempotency-Key": op.key},
        ) as resp:
            body = await resp.json()
            if resp.status == 200:
                assert body["durable"] is True
                op.acked = True
                return True
            assert resp.status == 503, (resp.status, body)  # not ready / store failed
            return False
    except (TimeoutError, aiohttp.ClientError):  # the kill broke the connection
        return False


async def values(session: aiohttp.ClientSession, node: NodeProcess) -> dict[str, int]:
    async with session.get(f"{node.url}/v1/counters") as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    return {c["labels"]["worker"]: c["value"] for c in body["counters"] if c["name"] == NAME}


def sums(ops: list[Op], *, acked: bool) -> dict[str, int]:
    out: dict[str, int] = {}
    for op in ops:
        if op.acked if acked else op.tries:
            out[op.worker] = out.get(op.worker, 0) + op.by
    return out


async def load_until_killed(
    session: aiohttp.ClientSession, node: NodeProcess, ops: list[Op], retry: list[Op],
    rnd: random.Random, kill_after: int,
) -> None:  # fmt: skip
    """CLIENTS concurrent clients (unanswered requests retried first) until
    the node was SIGKILLed after ``kill_after`` acknowledgements."""
    acks = 0
    killed = asyncio.Event()

    async def client(i: int) -> None:
        nonlocal acks
        while not killed.is_set():
            if retry:
                op = retry.pop()
            else:
                op = Op(str(i % 4), rnd.randint(1, 5), uuid.uuid4().hex)
                ops.append(op)
            if not await send(session, node, op):
                retry.append(op)
                continue
            acks += 1
            if acks >= kill_after and not killed.is_set():
                node.kill()
                killed.set()

    await asyncio.gather(*(client(i) for i in range(CLIENTS)))


async def crash_run(tmp_path: Path, store: str, coordinator: str) -> None:
    rnd = random.Random(7)
    node = NodeProcess(
        "node-1", store, port=free_port(), log=tmp_path / "node-1.log",
        extra=["--coordinator", coordinator, "--claim-ttl", "1"],
    )  # fmt: skip
    ops: list[Op] = []
    retry: list[Op] = []
    last: dict[str, int] = {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            for kill in range(KILLS + 1):
                node.start()
                await asyncio.to_thread(node.wait_ready, 60)
                now = await values(session, node)
                acked, attempted = sums(ops, acked=True), sums(ops, acked=False)
                for w in set(acked) | set(now) | set(last):
                    assert acked.get(w, 0) <= now.get(w, 0) <= attempted.get(w, 0), (
                        f"restart {kill}: worker {w} has {now.get(w, 0)}, acknowledged "
                        f"{acked.get(w, 0)}, attempted {attempted.get(w, 0)}{node.log_tail()}"
                    )
                    assert now.get(w, 0) >= last.get(w, 0), f"worker {w} went backwards"
                last = now
                if kill == KILLS:
                    break
                await load_until_killed(session, node, ops, retry, rnd, rnd.randint(50, 300))
                assert node.wait() == -9
            while retry:  # settle every request that never got an answer
                op = retry.pop()
                while not await send(session, node, op):
                    assert op.tries < 20, f"a retry kept failing{node.log_tail()}"
            assert await values(session, node) == sums(ops, acked=False), (
                "every keyed request counted exactly once"
            )
            assert any(op.tries > 1 for op in ops), "the kills left requests to retry"
    finally:
        node.stop()


def test_acknowledged_increments_survive_sigkill_on_bigtable(
    tmp_path: Path, bigtable_url: str, etcd: EtcdCluster
) -> None:
    asyncio.run(crash_run(tmp_path, bigtable_url, etcd.url_for(f"kc-{uuid.uuid4().hex[:8]}")))
