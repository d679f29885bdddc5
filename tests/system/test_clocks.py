"""Wall clock jumps change nothing: claims and leases run on the monotonic clock.

A one-node cluster (HAProxy, etcd, SQLite) whose node runs on a jumpable
wall clock (``keepcount.cluster.clocks``: libfaketime preloaded, only
``CLOCK_REALTIME`` faked).  Keyed increments go straight to the node while the node's clock jumps two hours ahead, then an hour behind the real
time, then back; each jump is asserted visible in the node's own answers
(its ``Date`` header) before the test goes on, and more increments must be
acknowledged on every clock.  The node must keep serving (``/readyz`` 200 at
every poll), keep its process and its claim (same pid, same epoch, no
restart), and the cluster's totals must equal the acknowledged increments.

The same run with a node whose lease is kept on the wall clock (``keepcount
node --unsafe-wall-clock-lease``, ``keepcount.coordination.wallclock``) must
fail those checks: the forward jump ends its claim, so the node is
restarted under a new epoch.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from clusters import running, wait_for

from keepcount.cluster import clocks
from keepcount.cluster.workload import KeyedLoad, labels_key

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.g4]

NAME = "clock_jumps_total"
LABELS = [{"shop": s} for s in ("a", "b")]
JUMPS = (2 * 3600, -3600, 0)
"""Seconds from the real time: two hours ahead, an hour behind, right again."""


async def _totals(session: aiohttp.ClientSession, url: str) -> dict[str, int]:
    async with session.get(f"{url}/v1/cluster/counters/{NAME}") as r:
        body = await r.json()
        assert r.status == 200, body
    return {labels_key(c["labels"]): c["value"] for c in body["counters"]}


async def _readyz(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    try:
        async with session.get(f"{url}/readyz", timeout=aiohttp.ClientTimeout(total=2)) as r:
            body = json.loads(await r.read())
            return r.status, body.get("epoch")
    except (OSError, aiohttp.ClientError, ValueError) as exc:
        return 0, type(exc).__name__


@pytest.mark.parametrize("mutant", [False, True], ids=["monotonic-lease", "wall-clock-mutant"])
def test_a_node_keeps_its_claim_and_its_counts_across_wall_clock_jumps(
    tmp_path: Path, mutant: bool
) -> None:
    asyncio.run(_jumps(tmp_path, mutant))


async def _jumps(tmp_path: Path, mutant: bool) -> None:
    assert clocks.unavailable() is None, clocks.unavailable()
    extra = {"clocks": True, "node_args": ["--unsafe-wall-clock-lease"] if mutant else []}
    async with running(tmp_path, nodes=1, extra=extra) as sup:
        node = "node-1"
        ns = sup.nodes[node]
        first = ns.current
        assert first is not None and sup.launcher.clocks is not None
        url = first.process.url
        # Straight to the node, not through the load balancer: every error
        # the clients see is then the node's (HAProxy's health checks of a node
        # on a loaded host are another matter).  The mutant is replaced, on
        # its other slot: its clients go through the load balancer.
        load = KeyedLoad(sup.spec.lb_url if mutant else url, NAME, LABELS, clients=4, seed=11)
        polls: list[tuple[int, Any]] = []
        stop = asyncio.Event()

        async def watch(session: aiohttp.ClientSession) -> None:
            """The first incarnation's /readyz, every 50 ms, until ``stop``."""
            while not stop.is_set():
                polls.append(await _readyz(session, url))
                await asyncio.sleep(0.05)  # a poll period, not a synchronisation

        def more_acked(target: int) -> Callable[[], bool]:
            return lambda: sum(load.acked.values()) >= target

        def current_url() -> str | None:
            cur = ns.current
            return cur.process.url if cur is not None and cur.ready else None

        async with aiohttp.ClientSession() as session:
            status, epoch = await _readyz(session, url)
            assert status == 200, (status, epoch)
            tasks = [
                asyncio.create_task(load.run(session, stop)),
                asyncio.create_task(watch(session)),
            ]
            try:
                await wait_for(lambda: sum(load.acked.values()) >= 30, 30, "first acknowledgements")
                for offset in JUMPS[:1] if mutant else JUMPS:  # forwards ends its claim
                    started = time.monotonic()
                    seen = await clocks.jump(sup.launcher.clocks, node, current_url, offset)
                    print(f"{node}: clock {offset:+d} s, seen {seen:+.1f} s "
                          f"after {time.monotonic() - started:.1f} s")  # fmt: skip
                    assert abs(seen - offset) <= clocks.TOLERANCE
                    await wait_for(more_acked(sum(load.acked.values()) + 30), 60,
                                   f"acknowledgements on a clock {offset:+d} s off")  # fmt: skip
            finally:
                stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks), 120)
            final = await _totals(session, load.url)
            after = await _readyz(session, current_url() or url)
        assert final == load.tally(), "totals == acknowledged increments, per label set"
        assert sum(final.values()) > 0
        print(f"{load.ops} increments, {load.retries} retries, errors {dict(load.errors)}; "
              f"{len(polls)} polls; restarts {ns.restarts}; epoch {epoch} -> {after[1]}")  # fmt: skip
        kept = ns.current is first and ns.restarts == 0 and after == (200, epoch)
        if mutant:  # the harness can fail: a wall-clock lease is caught
            assert not kept, "a lease on the wall clock went unnoticed"
            assert after[0] == 200 and after[1] > epoch, after
        else:
            assert kept, (ns.restarts, epoch, after)
            assert polls and all(p == (200, epoch) for p in polls), [
                p for p in polls if p != (200, epoch)
            ][:5]
            assert sum(load.errors.values()) == 0, dict(load.errors)
