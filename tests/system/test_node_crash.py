"""``keepcount node`` as a real process under concurrent HTTP load, SIGKILLed
mid-load many times and restarted.

- Without idempotency keys: after every restart each value lies between what
  the clients were acknowledged (200) and what they attempted, and neither
  the API nor ``/metrics`` ever shows a value lower than before.
- With idempotency keys: every request that got no answer (the kill broke
  its connection, or a 503) is retried with its key, on the restarted node
  or on a second node sharing the store, until it is acknowledged.  In the
  end the cluster total equals the sum of all requests exactly: nothing
  lost, nothing counted twice.

``KEEPCOUNT_NODE_KILLS`` sets the kills per test (CI runs the default).
"""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from keepcount.nodeproc import NodeProcess, free_port

KILLS = int(os.environ.get("KEEPCOUNT_NODE_KILLS", "25"))
CLIENTS = 16
NAME = "orders_total"
pytestmark = [pytest.mark.crash, pytest.mark.g1]


@dataclass
class Op:
    labels: dict[str, str]
    by: int
    key: str | None
    answer: int | None = None  # the value the node answered with, once acknowledged
    replayed: bool = False
    tries: int = 0


@dataclass
class History:
    ops: list[Op] = field(default_factory=list)
    retry: list[Op] = field(default_factory=list)

    def acked(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for op in self.ops:
            if op.answer is not None:
                w = op.labels["worker"]
                out[w] = out.get(w, 0) + op.by
        return out

    def attempted(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for op in self.ops:
            if op.tries:
                w = op.labels["worker"]
                out[w] = out.get(w, 0) + op.by
        return out


async def values(session: aiohttp.ClientSession, node: NodeProcess) -> dict[str, int]:
    async with session.get(f"{node.url}/v1/counters") as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    return {c["labels"]["worker"]: c["value"] for c in body["counters"] if c["name"] == NAME}


async def cluster(session: aiohttp.ClientSession, node: NodeProcess) -> dict[str, int]:
    async with session.get(f"{node.url}/v1/cluster/counters/{NAME}") as resp:
        if resp.status == 404:  # no node has counted it yet
            return {}
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    return {c["labels"]["worker"]: c["value"] for c in body["counters"]}


async def scraped(session: aiohttp.ClientSession, node: NodeProcess) -> dict[str, float]:
    async with session.get(f"{node.url}/metrics") as resp:
        assert resp.status == 200, await resp.text()
        text = await resp.text()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == NAME:
                out[s.labels["worker"]] = s.value
    return out


async def send(session: aiohttp.ClientSession, node: NodeProcess, op: Op) -> bool:
    """One attempt; True once acknowledged.  Any other outcome leaves it unknown."""
    op.tries += 1
    headers = {"Idempotency-Key": op.key} if op.key else {}
    try:
        async with session.post(
            f"{node.url}/v1/counters/{NAME}/increment",
            json={"labels": op.labels, "by": op.by},
            headers=headers,
        ) as resp:
            body = await resp.json()
            if resp.status == 200:
                assert body["durable"] is True
                op.answer = body["value"]
                op.replayed = resp.headers.get("Idempotency-Replayed") == "true"
                return True
            assert resp.status == 503, (resp.status, body)  # not ready / store failed
            return False
    except (TimeoutError, aiohttp.ClientError):  # the kill broke the connection
        return False


async def load(
    session: aiohttp.ClientSession,
    nodes: list[NodeProcess],
    hist: History,
    rnd: random.Random,
    *,
    keyed: bool,
    kill_after: int,
    victim: NodeProcess,
) -> None:
    """CLIENTS concurrent clients until ``victim`` was SIGKILLed after
    ``kill_after`` acknowledgements (counted across clients)."""
    acks = 0
    killed = asyncio.Event()

    async def client(i: int) -> None:
        nonlocal acks
        while not killed.is_set():
            if keyed and hist.retry:
                op = hist.retry.pop()
            else:
                op = Op(
                    {"worker": str(i % 4)}, rnd.randint(1, 5), uuid.uuid4().hex if keyed else None
                )
                hist.ops.append(op)
            node = rnd.choice(nodes)
            if await send(session, node, op):
                acks += 1
                if acks >= kill_after and not killed.is_set():
                    victim.kill()
                    killed.set()
            elif keyed:
                hist.retry.append(op)

    await asyncio.gather(*(client(i) for i in range(CLIENTS)))


def start(node: NodeProcess) -> list[int | None]:
    node.start()
    return node.wait_ready(timeout=30)


async def crash_run(tmp_path: Path, *, keyed: bool, seed: int) -> None:
    rnd = random.Random(seed)
    url = f"sqlite:///{tmp_path}/counters.db"
    one = NodeProcess("node-1", url, port=free_port(), log=tmp_path / "node-1.log")
    two = NodeProcess("node-2", url, port=free_port(), log=tmp_path / "node-2.log")
    nodes = [one, two] if keyed else [one]
    hist = History()
    last_api: dict[str, int] = {}
    last_scrape: dict[str, float] = {}
    timeout = aiohttp.ClientTimeout(total=10)
    try:
        if keyed:
            await asyncio.to_thread(start, two)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for kill in range(KILLS + 1):
                statuses = await asyncio.to_thread(start, one)
                assert statuses[-1] == 200 and all(s in (None, 503) for s in statuses[:-1]), (
                    statuses
                )
                now = await values(session, one)
                scrape = await scraped(session, one)
                # Keyed load spreads over two nodes: bound the cluster total.
                total = await cluster(session, one) if keyed else now
                acked, attempted = hist.acked(), hist.attempted()
                for w in set(acked) | set(total):
                    assert acked.get(w, 0) <= total.get(w, 0), (
                        f"kill {kill}: worker {w} has {total.get(w, 0)} < acknowledged {acked.get(w, 0)}"
                    )
                    assert total.get(w, 0) <= attempted.get(w, 0), (
                        f"{w} counted more than attempted"
                    )
                for w in set(now) | set(last_api):
                    assert now.get(w, 0) >= last_api.get(w, 0), f"{w} went backwards in the API"
                    assert scrape.get(w, 0) >= last_scrape.get(w, 0), (
                        f"{w} went backwards in /metrics"
                    )
                    assert scrape.get(w, 0) == now.get(w, 0)
                last_api, last_scrape = now, scrape
                if kill == KILLS:
                    break
                await load(
                    session,
                    nodes,
                    hist,
                    rnd,
                    keyed=keyed,
                    kill_after=rnd.randint(1, 400),
                    victim=one,
                )
                assert one.wait() == -9
            if keyed:  # settle every request that never got an answer
                while hist.retry:
                    op = hist.retry.pop()
                    while not await send(session, rnd.choice(nodes), op):
                        assert op.tries < 20, "a retry against live nodes kept failing"
                total = await cluster(session, one)
                expected: dict[str, int] = {}
                for op in hist.ops:
                    expected[op.labels["worker"]] = expected.get(op.labels["worker"], 0) + op.by
                assert total == expected, "every keyed request counted exactly once"
                assert any(op.tries > 1 for op in hist.ops), "the kills left requests to retry"
    finally:
        one.stop()
        two.stop()


@pytest.mark.slow
def test_acknowledged_increments_survive_sigkill_of_the_node(tmp_path: Path) -> None:
    asyncio.run(crash_run(tmp_path, keyed=False, seed=1))


@pytest.mark.g2
@pytest.mark.slow
def test_keyed_retries_after_kills_count_exactly_once_across_two_nodes(tmp_path: Path) -> None:
    asyncio.run(crash_run(tmp_path, keyed=True, seed=2))


@pytest.mark.g3
@pytest.mark.slow
def test_readyz_is_503_until_a_large_restore_completes(tmp_path: Path) -> None:
    """With 200k series to restore, the node is reachable (healthz 200) but not
    ready, and refuses increments, until every value is loaded."""
    import keepcount

    url = f"sqlite:///{tmp_path}/counters.db"
    with keepcount.open(url, node="node-1", max_children=None) as reg:
        fam = reg.counter(NAME, "", ["worker"])
        for i in range(200_000):
            fam.labels(f"w{i}").inc(i + 1)
    node = NodeProcess("node-1", url, port=free_port(), log=tmp_path / "node.log").start()
    try:

        async def main() -> None:
            async with aiohttp.ClientSession() as session:
                while True:  # until the port answers
                    try:
                        async with session.get(f"{node.url}/healthz") as resp:
                            assert resp.status == 200
                            break
                    except aiohttp.ClientConnectionError:
                        assert node.proc is not None and node.proc.poll() is None
                        await asyncio.sleep(0.002)
                async with session.get(f"{node.url}/readyz") as resp:
                    assert resp.status == 503, "not ready while restoring"
                    assert (await resp.json())["error"]["code"] == "not_ready"
                async with session.post(
                    f"{node.url}/v1/counters/{NAME}/increment", json={"labels": {"worker": "w1"}}
                ) as resp:
                    assert resp.status == 503
            await asyncio.to_thread(node.wait_ready, 60)
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{node.url}/v1/counters/{NAME}") as resp:
                    body = await resp.json()
                got = {c["labels"]["worker"]: c["value"] for c in body["counters"]}
                assert len(got) == 200_000 and got["w1"] == 2 and got["w199999"] == 200_000

        asyncio.run(main())
    finally:
        node.stop()
