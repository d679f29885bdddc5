"""A supervised keepcount cluster in the test's event loop, shared by the
system tests that run one (``test_cluster``, ``test_cassandra_store``,
``test_cassandra_replica_kill``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from keepcount.cluster.spec import ClusterSpec
from keepcount.cluster.supervisor import Supervisor


async def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until ``cond()`` held; fails the test after ``timeout``."""
    started = time.monotonic()
    while not cond():
        assert time.monotonic() - started < timeout, f"{what} (after {timeout} s)"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


@contextlib.asynccontextmanager
async def running(tmp_path: Path, **spec: Any) -> AsyncIterator[Supervisor]:
    """A cluster of ``ClusterSpec.allocate(..., **spec)``, ready; stopped at
    the end, with each node's log tail printed (shown when a test fails)."""
    cluster = ClusterSpec.allocate(tmp_path / "cluster", **spec)
    cluster.save()
    sup = Supervisor(cluster, api=False)
    task = asyncio.create_task(sup.run())
    try:
        await wait_for(lambda: sup.ready.is_set() or task.done(), 120, "cluster start")
        if task.done():
            task.result()
        yield sup
    finally:
        sup.stop()
        await asyncio.wait_for(task, 90)
        for path in (cluster.directory / "nodes").glob("*.log"):
            print(f"--- {path.name}\n{path.read_text(errors='replace')[-1500:]}")
