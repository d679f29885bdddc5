"""Settling an idempotency key (``Registry.settle_key``, ``GET /v1/idempotency/{key}``).

Real SQLite files throughout.  A flush is made to fail for real: another
process holds the database's write lock (``BEGIN EXCLUSIVE``), so the
node's write times out busy (``StoreUnavailable``) and its keyed delta stays
queued in memory, exactly as after a disk or network hiccup.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import test_node_api
from test_node_api import Running, error_of, serve

import keepcount
from keepcount import (
    IdempotencyKeySettled,
    OutcomeUnknown,
    Registry,
    SettleStatus,
    StoreUnavailable,
)
from keepcount.errors import KeyConflict
from keepcount.process import apoll_until
from keepcount.settle import is_refusal
from keepcount.stores import open_store
from keepcount.stores.base import KeyRecord
from keepcount.stores.sqlite import SQLiteStore

# test_node_api's fixtures (pytest registers them by their own names): anyio_backend,
# url (tmp_path / "counters.db") and node (a ready node on it).
anyio_backend = test_node_api.anyio_backend
url = test_node_api.url
node = test_node_api.node

BUSY = 0.2
"""Seconds a write waits for the lock before it fails (``busy_timeout``)."""

_LOCKER = """
import sqlite3, sys
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
c.execute("ROLLBACK")
"""


class Locker:
    """Another process holding the database's write lock until ``release()``."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LOCKER, str(path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "locked"  # it holds the lock now

    def release(self) -> None:
        if self.proc.returncode is None:
            self.proc.communicate("\n", timeout=10)  # closes the pipes too
            assert self.proc.returncode == 0


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "counters.db"  # the file of test_node_api's ``url``


MakeLocker = Callable[[Path], Locker]


@pytest.fixture
def locker() -> Iterator[MakeLocker]:
    made: list[Locker] = []

    def make(p: Path) -> Locker:
        made.append(Locker(p))
        return made[-1]

    yield make
    for lock in made:
        lock.release()


def open_reg(path: Path, node: str, **kw: object) -> Registry:
    store = SQLiteStore(path, busy_timeout=BUSY)
    return Registry(store, node, flush_interval=None, **kw)  # type: ignore[arg-type]


def stored_key(path: Path, key: str) -> KeyRecord | None:
    store = SQLiteStore(path)
    try:
        return store.lookup_key(key)
    finally:
        store.close()


def key_count(path: Path) -> int:
    """Every idempotency record in the file, read by another connection."""
    import sqlite3

    with sqlite3.connect(path) as c:
        (n,) = c.execute("SELECT count(*) FROM idempotency").fetchone()
    return int(n)


def durable(path: Path, node: str) -> dict[str, int]:
    store = SQLiteStore(path)
    try:
        return {k: int(v) for k, v in store.load(node).values.get("c_total", {}).items()}
    finally:
        store.close()


@pytest.mark.g2
def test_an_applied_key_settles_applied_with_its_original_receipt(path: Path) -> None:
    with open_reg(path, "node-1") as one, open_reg(path, "node-2") as two:
        child = one.counter("c_total", "", ["k"]).labels("a")
        two.counter("c_total", "", ["k"]).labels("a")

        async def main() -> tuple[keepcount.Receipt, keepcount.Settlement, keepcount.Settlement]:
            first = await one.increment(child, 5, key="k-1", fingerprint="f")
            await one.increment(child, 2)
            return first, await one.settle_key("k-1"), await two.settle_key("k-1")

        first, here, there = asyncio.run(main())
        for settled in (here, there):
            assert settled.status is SettleStatus.APPLIED and settled.final
            assert settled.receipt == first, "the first answer, whichever node settles"
        assert child.value == 7
    assert durable(path, "node-1") == {'["a"]': 7}


@pytest.mark.g2
def test_an_unknown_key_settles_not_applied_for_good(path: Path) -> None:
    with open_reg(path, "node-1", idempotency_ttl=3600) as one, open_reg(path, "node-2") as two:
        child = one.counter("c_total", "", ["k"]).labels("a")
        c2 = two.counter("c_total", "", ["k"]).labels("a")

        async def main() -> None:
            before = time.time()
            settled = await one.settle_key("k-never")
            assert settled.status is SettleStatus.NOT_APPLIED and settled.receipt is None
            record = stored_key(path, "k-never")
            assert record is not None and is_refusal(record), "durable before the answer"
            assert before + 3600 <= record.expires <= time.time() + 3600, "the keys' TTL"
            for reg, c in ((one, child), (two, c2)):  # a late request, on any node
                with pytest.raises(IdempotencyKeySettled, match="settled as not applied"):
                    await reg.increment(c, 1, key="k-never", fingerprint="f")
            again = await two.settle_key("k-never")
            assert again.status is SettleStatus.NOT_APPLIED, "the fate never changes"

        asyncio.run(main())
        assert child.value == c2.value == 0
    assert durable(path, "node-1") == {}
    assert durable(path, "node-2") == {}


@pytest.mark.g2
def test_a_queued_delta_flushed_after_the_refusal_is_dropped(
    path: Path, locker: MakeLocker
) -> None:
    """The key's delta is queued on node-1 (its flush failed: the store was
    locked by another process); node-2 settles the key: not applied.  When
    node-1 flushes afterwards, its delta meets the refusal and is dropped:
    nothing counted, and its retry is refused."""
    with open_reg(path, "node-1") as one, open_reg(path, "node-2") as two:
        child = one.counter("c_total", "", ["k"]).labels("a")
        one.commit_sync()  # the family's definition, before the lock
        lock = locker(path)

        async def main() -> None:
            with pytest.raises(StoreUnavailable):
                await one.increment(child, 3, key="k-late", fingerprint="f")
            # Still queued on node-1: it answers in flight, whatever it is asked.
            assert (await one.settle_key("k-late")).status is SettleStatus.IN_FLIGHT
            lock.release()
            settled = await two.settle_key("k-late")
            assert settled.status is SettleStatus.NOT_APPLIED
            await one.commit()  # the late flush: the delta meets the refusal
            with pytest.raises(IdempotencyKeySettled, match="node-2"):
                await one.increment(child, 3, key="k-late", fingerprint="f")
            assert (await one.settle_key("k-late")).status is SettleStatus.NOT_APPLIED

        asyncio.run(main())
        assert child.value == 0 and one.flushes >= 2
    assert durable(path, "node-1") == {}
    assert durable(path, "node-2") == {}


@pytest.mark.g2
def test_a_delta_that_landed_first_makes_the_settle_applied(path: Path, locker: MakeLocker) -> None:
    """The other order: the queued delta flushes before anyone settles; the
    settle then finds the key applied, with the receipt of that flush."""
    with open_reg(path, "node-1") as one, open_reg(path, "node-2") as two:
        child = one.counter("c_total", "", ["k"]).labels("a")
        one.commit_sync()
        lock = locker(path)

        async def main() -> keepcount.Settlement:
            waiting = asyncio.ensure_future(one.increment(child, 4, key="k", fingerprint="f"))
            with pytest.raises(StoreUnavailable):
                await waiting
            lock.release()
            await one.commit()
            return await two.settle_key("k")

        settled = asyncio.run(main())
        assert settled.status is SettleStatus.APPLIED
        assert settled.receipt == keepcount.Receipt("node-1", "c_total", {"k": "a"}, 4)
        assert child.value == 4
    assert durable(path, "node-1") == {'["a"]': 4}


@pytest.mark.g2
def test_a_settle_whose_refusal_cannot_be_written_fails_and_the_next_flush_writes_it(
    path: Path, locker: MakeLocker
) -> None:
    """While the settle's flush waits for the lock, an increment of that key
    on the same node counts nothing (its fate is being decided); the failed
    settle answers the error, and its refusal stays queued (a store that
    took the key for it must see it recorded by the same writer)."""
    with open_reg(path, "node-1") as one:
        child = one.counter("c_total", "", ["k"]).labels("a")
        one.commit_sync()
        lock = locker(path)

        async def main() -> None:
            settling = asyncio.ensure_future(one.settle_key("k"))
            await apoll_until(lambda: "k" in one._group.refusals, 5, "the refusal queued")
            with pytest.raises(OutcomeUnknown, match="being settled on this node"):
                await one.increment(child, 1, key="k", fingerprint="f")
            with pytest.raises(StoreUnavailable):
                await settling
            lock.release()
            assert stored_key(path, "k") is None, "nothing written yet"
            assert "k" in one._group.refusals, "still queued"
            await one.commit()
            record = stored_key(path, "k")
            assert record is not None and is_refusal(record)
            assert (await one.settle_key("k")).status is SettleStatus.NOT_APPLIED

        asyncio.run(main())
        assert child.value == 0


# -- over HTTP ------------------------------------------------------------------


def add(client: httpx.AsyncClient, key: str, by: int = 1) -> object:
    return client.post("/v1/counters/c_total/increment", json={"by": by},
                       headers={"Idempotency-Key": key})  # fmt: skip


@pytest.mark.g2
@pytest.mark.anyio
async def test_the_endpoint_answers_applied_and_not_applied(node: Running) -> None:
    first = await add(node.client, "k/1?#%", 2)  # type: ignore[misc]
    assert first.status_code == 200
    r = await node.client.get("/v1/idempotency/k%2F1%3F%23%25")
    assert r.status_code == 200, r.text
    assert r.json() == {"key": "k/1?#%", "status": "applied", "receipt": first.json()}
    r = await node.client.get("/v1/idempotency/k-2")
    assert r.json() == {"key": "k-2", "status": "not_applied", "receipt": None}
    late = await add(node.client, "k-2")  # type: ignore[misc]
    error_of(late, 409, "idempotency_key_settled")
    listed = (await node.client.get("/v1/counters/c_total")).json()["counters"]
    assert [s["value"] for s in listed] == [2], "the refused increment counted nothing"


@pytest.mark.g6
@pytest.mark.anyio
@pytest.mark.parametrize("key", ["", "a%20b", "x" * 256, "%C3%A9", "tab%09", "a%0Ab", "a/b%0A"])
async def test_a_malformed_key_is_400_and_writes_nothing(
    node: Running, path: Path, key: str
) -> None:
    r = await node.client.get(f"/v1/idempotency/{key}")
    error_of(r, 400, "invalid_idempotency_key")
    assert key_count(path) == 0
    assert (await node.client.get("/v1/idempotency/" + "x" * 255)).status_code == 200
    assert key_count(path) == 1, "the longest key is accepted (and refused in the store)"


@pytest.mark.g6
@pytest.mark.anyio
async def test_settling_takes_the_token_when_the_node_has_one(url: str) -> None:
    async with serve(url, token="s3cret") as running:
        await running.wait_ready()
        error_of(await running.client.get("/v1/idempotency/k"), 401, "unauthorized")
        assert key_count(Path(url.removeprefix("sqlite:///"))) == 0
        r = await running.client.get(
            "/v1/idempotency/k", headers={"Authorization": "Bearer s3cret"}
        )
        assert r.json()["status"] == "not_applied"


@pytest.mark.g2
@pytest.mark.anyio
async def test_the_endpoint_answers_in_flight_while_the_key_is_being_flushed(
    node: Running, path: Path, locker: MakeLocker
) -> None:
    """The store is locked by another process: the increment's flush waits
    for it (up to the busy timeout); meanwhile the key is in flight."""
    lock = locker(path)
    pending = asyncio.ensure_future(add(node.client, "k-q"))  # type: ignore[arg-type]
    await apoll_until(lambda: "k-q" in node.registry._group.keyed, 5, "the key queued")
    r = await node.client.get("/v1/idempotency/k-q")
    assert r.json() == {"key": "k-q", "status": "in_flight", "receipt": None}
    lock.release()
    done = await pending
    assert done.status_code == 200, done.text
    r = await node.client.get("/v1/idempotency/k-q")
    assert r.json() == {"key": "k-q", "status": "applied", "receipt": done.json()}


# -- every store ----------------------------------------------------------------


@pytest.mark.g2
def test_settling_works_alike_on_every_store(store_url: str) -> None:
    """Refusals are plain key records (stores keep ``result`` opaque): on
    SQLite, Cassandra and Bigtable alike a settle answers applied with the
    first receipt, or not applied for good.  Where a key can be taken by a
    writer before its record lands (Cassandra, Bigtable), a settle of such a
    key answers in flight and writes nothing."""
    regs = [Registry(open_store(store_url), f"node-{i}", flush_interval=None) for i in (1, 2)]
    one, two = regs
    try:
        c1, c2 = (r.counter("c_total", "", ["k"]).labels("a") for r in regs)

        async def main() -> None:
            first = await one.increment(c1, 5, key="k-a", fingerprint="f")
            settled = await two.settle_key("k-a")
            assert (settled.status, settled.receipt) == (SettleStatus.APPLIED, first)

            assert (await two.settle_key("k-n")).status is SettleStatus.NOT_APPLIED
            with pytest.raises(IdempotencyKeySettled):
                await one.increment(c1, 1, key="k-n", fingerprint="f")
            assert (await one.settle_key("k-n")).status is SettleStatus.NOT_APPLIED

            if store_url.startswith("sqlite"):
                return  # one transaction: a key is recorded or free, never taken
            await two.increment(c2, 1, key="kx", fingerprint="f")
            # node-1 takes k-t, but its write is refused (kx is recorded): k-t
            # is taken by a live writer whose record may still land.
            taken = [keyed_record("k-t", "node-1"), keyed_record("kx", "node-1")]
            with pytest.raises(KeyConflict):
                one.store.write("node-1", one.epoch, [], [], taken)
            assert (await two.settle_key("k-t")).status is SettleStatus.IN_FLIGHT
            assert two.store.lookup_key("k-t") is None, "no refusal written"

        asyncio.run(main())
        assert c1.value == 5
    finally:
        for reg in regs:
            reg.close()


def keyed_record(key: str, node: str) -> KeyRecord:
    return KeyRecord(key, node, "fp", '{"value": 1}', f"token-{key}-{node}", time.time() + 3600)
