"""The group commit protocol, on a real SQLite store whose writes can be held or failed."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import keepcount
from keepcount import Fenced, RegistryClosed, StoreUnavailable
from keepcount.registry import Registry
from keepcount.stores.base import FamilyDef, KeyRecord, SeriesRow
from keepcount.stores.sqlite import SQLiteStore


class FaultyStore(SQLiteStore):
    """A real SQLite store; each write can be held at a gate or made to fail."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.writes: list[list[SeriesRow]] = []
        self.fail: Exception | None = None
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Semaphore(0)

    def write(self, node: str, epoch: int, families: Sequence[FamilyDef],
              series: Sequence[SeriesRow], keys: Sequence[KeyRecord] = ()) -> None:  # fmt: skip
        self.entered.release()
        assert self.gate.wait(10), "test gate never opened"
        if self.fail is not None:
            raise self.fail
        super().write(node, epoch, families, series, keys)
        self.writes.append(list(series))


@pytest.fixture
def store(tmp_path: Path) -> FaultyStore:
    return FaultyStore(tmp_path / "c.db")


@pytest.fixture
def freg(store: FaultyStore) -> Iterator[Registry]:
    r = Registry(store, "node-1", flush_interval=None)
    yield r
    store.gate.set()
    store.fail = None
    if not r.closed:
        r.close()


def durable(store: FaultyStore) -> dict[str, int]:
    snap = store.load("node-1")
    return {k: v for k, v in snap.values.get("c_total", {}).items() if isinstance(v, int)}


@pytest.mark.g1
def test_commit_with_nothing_dirty_writes_nothing(freg: Registry, store: FaultyStore) -> None:
    freg.commit_sync()
    asyncio.run(freg.commit())
    assert store.writes == []


@pytest.mark.g1
def test_commit_makes_earlier_increments_durable(freg: Registry, store: FaultyStore) -> None:
    c = freg.counter("c_total", "", ["k"])
    c.labels("a").inc(2)
    c.labels("b").inc(3)
    freg.commit_sync()
    assert durable(store) == {'["a"]': 2, '["b"]': 3}
    c.labels("a").inc()
    freg.commit_sync()
    assert store.writes[-1] == [("c_total", '["a"]', 3, pytest.approx(store.writes[0][0][3]))]


@pytest.mark.g1
def test_concurrent_async_waiters_share_one_write(freg: Registry, store: FaultyStore) -> None:
    c = freg.counter("c_total", "", ["k"])

    async def main() -> None:
        store.gate.clear()
        c.labels("first").inc()
        first = asyncio.ensure_future(freg.commit())  # flush 1 is held at the gate
        await asyncio.to_thread(store.entered.acquire)

        async def writer(i: int) -> None:
            c.labels(str(i)).inc()
            await freg.commit()

        rest = [asyncio.ensure_future(writer(i)) for i in range(64)]
        await asyncio.sleep(0)  # let all 64 register behind the held flush
        store.gate.set()
        await asyncio.gather(first, *rest)

    asyncio.run(main())
    assert len(store.writes) == 2, "64 waiters that arrived together share the next flush"
    assert len(store.writes[1]) == 64
    assert len(durable(store)) == 65


@pytest.mark.g1
def test_a_commit_during_a_flush_waits_for_the_next_flush(
    freg: Registry, store: FaultyStore
) -> None:
    c = freg.counter("c_total", "", ["k"])
    c.labels("a").inc()
    store.gate.clear()
    t1 = threading.Thread(target=freg.commit_sync)
    t1.start()
    assert store.entered.acquire(timeout=5)  # flush 1 holds a=1, in flight
    c.labels("a").inc()  # not in flush 1
    done = threading.Event()
    t2 = threading.Thread(target=lambda: (freg.commit_sync(), done.set()))
    t2.start()
    store.gate.set()
    t1.join()
    t2.join()
    assert done.is_set()
    assert durable(store) == {'["a"]': 2}, "the second commit returned before a=2 was durable"


@pytest.mark.g1
def test_waiting_on_the_flush_in_flight_when_nothing_is_dirty(
    freg: Registry, store: FaultyStore
) -> None:
    c = freg.counter("c_total", "", ["k"])
    c.labels("a").inc()
    store.gate.clear()
    t1 = threading.Thread(target=freg.commit_sync)
    t1.start()
    assert store.entered.acquire(timeout=5)
    returned = threading.Event()
    t2 = threading.Thread(target=lambda: (freg.commit_sync(), returned.set()))
    t2.start()
    t2.join(0.2)
    assert not returned.is_set(), "commit returned while the increment was still in flight"
    store.gate.set()
    t1.join()
    t2.join()
    assert returned.is_set() and durable(store) == {'["a"]': 1}


@pytest.mark.g1
def test_a_failed_flush_fails_its_waiters_and_keeps_values_dirty(
    freg: Registry, store: FaultyStore
) -> None:
    c = freg.counter("c_total", "", ["k"])
    c.labels("a").inc(5)
    store.fail = StoreUnavailable("disk on fire")
    with pytest.raises(StoreUnavailable, match="disk on fire"):
        freg.commit_sync()
    with pytest.raises(StoreUnavailable):
        asyncio.run(freg.commit())
    assert c.labels("a").value == 5  # memory keeps it
    store.fail = None
    freg.commit_sync()  # the retry writes what the failed flushes could not
    assert durable(store) == {'["a"]': 5}


@pytest.mark.g1
def test_an_unexpected_driver_error_is_not_acknowledged(freg: Registry, store: FaultyStore) -> None:
    freg.counter("c_total").inc()
    store.fail = RuntimeError("driver bug")
    with pytest.raises(StoreUnavailable, match="driver bug"):
        freg.commit_sync()


@pytest.mark.g4
def test_fenced_is_final(freg: Registry, store: FaultyStore) -> None:
    freg.counter("c_total").inc()
    store.fail = Fenced("newer epoch")
    with pytest.raises(Fenced):
        freg.commit_sync()
    store.fail = None
    freg.counter("c_total").inc()
    with pytest.raises(Fenced):
        freg.commit_sync()
    with pytest.raises(Fenced):
        asyncio.run(freg.commit())
    assert freg.fenced


@pytest.mark.g1
def test_the_event_loop_runs_while_a_flush_is_held(freg: Registry, store: FaultyStore) -> None:
    freg.counter("c_total").inc()
    store.gate.clear()

    async def main() -> int:
        ticks = 0
        task = asyncio.ensure_future(freg.commit())
        await asyncio.to_thread(store.entered.acquire)
        for _ in range(50):
            await asyncio.sleep(0)
            ticks += 1
        assert not task.done()
        store.gate.set()
        await task
        return ticks

    assert asyncio.run(main()) == 50


@pytest.mark.g1
def test_background_interval_flushes_without_commit(store: FaultyStore) -> None:
    reg = Registry(store, "node-1", flush_interval=0.05)
    try:
        reg.counter("c_total").inc(9)
        assert store.entered.acquire(timeout=5), "no background flush within 5 s"
        reg.commit_sync()  # waits for that flush in flight if it has not finished
        assert durable(store) == {"[]": 9}
    finally:
        reg.close()


@pytest.mark.g1
def test_close_flushes_and_later_commits_are_refused(store: FaultyStore, tmp_path: Path) -> None:
    reg = Registry(store, "node-1", flush_interval=None)
    reg.counter("c_total").inc(4)
    reg.close()
    with pytest.raises(RegistryClosed):
        reg.commit_sync()
    with keepcount.open(f"sqlite:///{tmp_path}/c.db", node="node-1") as again:
        assert again.counter("c_total").value == 4


@pytest.mark.g1
def test_close_reports_a_failed_final_flush(store: FaultyStore) -> None:
    reg = Registry(store, "node-1", flush_interval=None)
    reg.counter("c_total").inc(4)
    store.fail = StoreUnavailable("gone")
    with pytest.raises(StoreUnavailable, match="gone"):
        reg.close()


class CommitMachine(RuleBasedStateMachine):
    """Random increments, commits and store failures: a successful commit
    always leaves the store holding at least the values seen before it, and
    never more than memory."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.dir = tempfile.TemporaryDirectory()
        self.store = FaultyStore(Path(self.dir.name) / "c.db")
        self.reg = Registry(self.store, "node-1", flush_interval=None)
        self.fam = self.reg.counter("c_total", "", ["k"])

    @rule(key=st.sampled_from("abc"), amount=st.integers(0, 10))
    def inc(self, key: str, amount: int) -> None:
        self.fam.labels(key).inc(amount)

    @rule(fail=st.booleans())
    def commit(self, fail: bool) -> None:
        before = {f'["{k}"]': v for (k,), v in self.fam.items()}
        self.store.fail = StoreUnavailable("injected") if fail else None
        try:
            self.reg.commit_sync()
        except StoreUnavailable:
            assert fail
            return
        assert not fail or not before or durable(self.store) == before
        assert durable(self.store) == before

    @invariant()
    def store_never_ahead_of_memory(self) -> None:
        if hasattr(self, "fam"):
            memory = {f'["{k}"]': v for (k,), v in self.fam.items()}
            for k, v in durable(self.store).items():
                assert v <= memory[k]

    def teardown(self) -> None:
        self.store.fail = None
        self.reg.close()
        self.dir.cleanup()


TestCommitMachine = CommitMachine.TestCase
TestCommitMachine.settings = settings(max_examples=40, stateful_step_count=20, deadline=None)
TestCommitMachine.pytestmark = [pytest.mark.g1]


@pytest.mark.g1
def test_cancelling_one_waiter_leaves_the_others_waiting(
    freg: Registry, store: FaultyStore
) -> None:
    c = freg.counter("c_total", "", ["k"])

    async def main() -> None:
        store.gate.clear()
        c.labels("a").inc()
        held = asyncio.ensure_future(freg.commit())
        await asyncio.to_thread(store.entered.acquire)
        c.labels("b").inc()
        first, second = asyncio.ensure_future(freg.commit()), asyncio.ensure_future(freg.commit())
        await asyncio.sleep(0)
        first.cancel()
        store.gate.set()
        await held
        await second  # not cancelled by its neighbour
        with pytest.raises(asyncio.CancelledError):
            await first
        assert second.done() and not second.cancelled()

    asyncio.run(main())
    assert durable(store) == {'["a"]': 1, '["b"]': 1}
