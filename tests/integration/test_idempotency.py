"""Idempotency keys through the registry: counted once per store, whichever node a retry reaches."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

import keepcount
from keepcount import Fenced, IdempotencyKeyReused, OutcomeUnknown, Registry, StoreUnavailable
from keepcount.errors import KeyConflict
from keepcount.metrics import CounterChild
from keepcount.settle import SettleStatus
from keepcount.stores.base import FamilyDef, KeyRecord, SeriesRow
from keepcount.stores.sqlite import SQLiteStore


class FlakyStore(SQLiteStore):
    """A real SQLite store whose next writes fail: before writing
    (``StoreUnavailable``) or after the write landed (``OutcomeUnknown``)."""

    fail_before = 0
    fail_after = 0

    def write(self, node: str, epoch: int, families: Sequence[FamilyDef],
              series: Sequence[SeriesRow], keys: Sequence[KeyRecord] = ()) -> None:  # fmt: skip
        if self.fail_before:
            self.fail_before -= 1
            raise StoreUnavailable("injected: disk unplugged")
        super().write(node, epoch, families, series, keys)
        if self.fail_after:
            self.fail_after -= 1
            raise OutcomeUnknown("injected: the answer was lost after the commit")


def durable(path: Path, node: str = "node-1") -> dict[str, int]:
    """The node's stored counter values, read through a separate handle."""
    store = SQLiteStore(path)
    try:
        values = store.load(node).values.get("c_total", {})
        return {k: int(v) for k, v in values.items()}
    finally:
        store.close()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "c.db"


def open_reg(path: Path, node: str = "node-1", **kw: object) -> Registry:
    return keepcount.open(f"sqlite:///{path}", node=node, flush_interval=None, **kw)  # type: ignore[arg-type]


@pytest.mark.g2
def test_a_retried_key_is_counted_once_and_answered_as_first(path: Path) -> None:
    with open_reg(path) as reg:
        child = reg.counter("c_total", "", ["k"]).labels("a")

        async def main() -> list[keepcount.Receipt]:
            first = await reg.increment(child, 5, key="k-1", fingerprint="f")
            again = await reg.increment(child, 5, key="k-1", fingerprint="f")
            other = await reg.increment(child, 2, key="k-2", fingerprint="g")
            return [first, again, other]

        first, again, other = asyncio.run(main())
        assert (first.value, first.replayed) == (5, False)
        assert (again.value, again.replayed) == (5, True), "the original answer, counted once"
        assert again.node == "node-1" and again.labels == {"k": "a"}
        assert (other.value, other.replayed) == (7, False)
        assert child.value == 7
    assert durable(path) == {'["a"]': 7}


@pytest.mark.g2
def test_concurrent_requests_with_one_key_count_once(path: Path) -> None:
    with open_reg(path) as reg:
        child = reg.counter("c_total", "", ["k"]).labels("a")

        async def main() -> list[keepcount.Receipt]:
            return await asyncio.gather(
                *(reg.increment(child, 3, key="same", fingerprint="f") for _ in range(20))
            )

        receipts = asyncio.run(main())
        assert {r.value for r in receipts} == {3}
        assert sum(not r.replayed for r in receipts) == 1
        assert child.value == 3
    assert durable(path) == {'["a"]': 3}


@pytest.mark.g2
def test_a_key_reused_for_another_request_is_refused_and_changes_nothing(path: Path) -> None:
    with open_reg(path) as reg:
        child = reg.counter("c_total", "", ["k"]).labels("a")

        async def main() -> None:
            await reg.increment(child, 1, key="k", fingerprint="body-1")
            with pytest.raises(IdempotencyKeyReused, match="'k'"):
                await reg.increment(child, 9, key="k", fingerprint="body-2")

        asyncio.run(main())
        assert child.value == 1
    assert durable(path) == {'["a"]': 1}


@pytest.mark.g2
def test_a_retry_on_another_node_sharing_the_store_is_counted_once(path: Path) -> None:
    with open_reg(path, "node-1") as one, open_reg(path, "node-2") as two:
        c1 = one.counter("c_total", "", ["k"]).labels("a")
        c2 = two.counter("c_total", "", ["k"]).labels("a")

        async def main() -> tuple[keepcount.Receipt, keepcount.Receipt]:
            first = await one.increment(c1, 4, key="k", fingerprint="f")
            retry = await two.increment(c2, 4, key="k", fingerprint="f")
            return first, retry

        first, retry = asyncio.run(main())
        assert retry.replayed and retry.node == "node-1" and retry.value == first.value == 4
        assert c2.value == 0, "node-2 counted nothing"
        assert [t.value for t in two.cluster("c_total")] == [4]


@pytest.mark.g2
def test_racing_nodes_with_one_key_count_it_once(path: Path) -> None:
    """Two nodes get the same key at the same moment (a load balancer retry of
    a slow request): the store decides; exactly one of them counts it."""
    with open_reg(path, "node-1") as one, open_reg(path, "node-2") as two:
        c1 = one.counter("c_total", "", ["k"]).labels("a")
        c2 = two.counter("c_total", "", ["k"]).labels("a")

        async def main() -> list[keepcount.Receipt]:
            out = []
            for i in range(30):
                out += await asyncio.gather(
                    one.increment(c1, 1, key=f"k{i}", fingerprint="f"),
                    two.increment(c2, 1, key=f"k{i}", fingerprint="f"),
                )
            return out

        receipts = asyncio.run(main())
        assert sum(not r.replayed for r in receipts) == 30
        assert c1.value + c2.value == 30
        assert [t.value for t in one.cluster("c_total")] == [30]


@pytest.mark.g2
def test_a_failed_write_is_not_acknowledged_and_its_retry_counts_once(path: Path) -> None:
    store = FlakyStore(path)
    reg = Registry(store, "node-1", flush_interval=None)
    try:
        child = reg.counter("c_total", "", ["k"]).labels("a")

        async def main() -> keepcount.Receipt:
            store.fail_before = 1
            with pytest.raises(StoreUnavailable, match="injected"):
                await reg.increment(child, 2, key="k", fingerprint="f")
            assert child.value == 0, "not acknowledged, not counted yet"
            return await reg.increment(child, 2, key="k", fingerprint="f")

        receipt = asyncio.run(main())
        assert receipt.value == 2
        assert child.value == 2
    finally:
        reg.close()
    assert durable(path) == {'["a"]': 2}


@pytest.mark.g2
def test_a_landed_write_whose_answer_was_lost_is_recognised_not_counted_twice(
    path: Path,
) -> None:
    store = FlakyStore(path)
    reg = Registry(store, "node-1", flush_interval=None)
    try:
        child = reg.counter("c_total", "", ["k"]).labels("a")

        async def main() -> keepcount.Receipt:
            store.fail_after = 1
            with pytest.raises(OutcomeUnknown):
                await reg.increment(child, 2, key="k", fingerprint="f")
            assert durable(path) == {'["a"]': 2}, "the write did land"
            return await reg.increment(child, 2, key="k", fingerprint="f")

        receipt = asyncio.run(main())
        assert receipt.value == 2
        assert child.value == 2, "memory caught up with the store, once"
        child.inc()
        reg.commit_sync()
    finally:
        reg.close()
    assert durable(path) == {'["a"]': 3}


@pytest.mark.g2
def test_a_cancelled_request_is_still_recorded_and_its_retry_replays(path: Path) -> None:
    store = FlakyStore(path)
    reg = Registry(store, "node-1", flush_interval=None)
    try:
        child = reg.counter("c_total", "", ["k"]).labels("a")

        async def main() -> keepcount.Receipt:
            store.fail_before = 1  # the first flush fails, so the increment stays queued
            task = asyncio.ensure_future(reg.increment(child, 1, key="k", fingerprint="f"))
            with pytest.raises(StoreUnavailable):
                await task
            other = asyncio.ensure_future(reg.increment(child, 1, key="k", fingerprint="f"))
            await asyncio.sleep(0)
            other.cancel()  # the client went away; the queued increment stays
            reg.commit_sync()
            return await reg.increment(child, 1, key="k", fingerprint="f")

        receipt = asyncio.run(main())
        assert receipt.replayed and receipt.value == 1
        assert child.value == 1
    finally:
        reg.close()


@pytest.mark.g2
def test_an_expired_key_counts_again(path: Path) -> None:
    with open_reg(path, idempotency_ttl=1e-6) as reg:
        child = reg.counter("c_total", "", ["k"]).labels("a")

        async def main() -> None:
            await reg.increment(child, 1, key="k", fingerprint="f")
            second = await reg.increment(child, 1, key="k", fingerprint="f")
            assert not second.replayed

        asyncio.run(main())
        assert child.value == 2


@pytest.mark.g4
def test_keys_of_a_fenced_incarnation_are_refused(path: Path) -> None:
    with open_reg(path) as reg:
        child = reg.counter("c_total", "", ["k"]).labels("a")
        reg.store.release("node-1", reg.epoch)  # the claim is lost; a newer incarnation takes over
        newer = SQLiteStore(path)
        newer.claim("node-1", reg.epoch + 1)  # as a coordinator would
        try:

            async def main() -> None:
                with pytest.raises(Fenced):
                    await reg.increment(child, 1, key="k", fingerprint="f")

            asyncio.run(main())
            assert newer.lookup_key("k") is None
        finally:
            newer.close()


class BusyKeyStore(SQLiteStore):
    """A real SQLite store that reports one key as being recorded by another
    live node (what the Cassandra store reports when a retry reaches a second
    node while the first attempt is in flight on the first)."""

    busy = ""

    def write(self, node: str, epoch: int, families: Sequence[FamilyDef],
              series: Sequence[SeriesRow], keys: Sequence[KeyRecord] = ()) -> None:  # fmt: skip
        if any(k.key == self.busy for k in keys):
            raise KeyConflict("injected: being recorded elsewhere", pending=[self.busy])
        super().write(node, epoch, families, series, keys)


async def one_flush_of_three(reg: Registry, child: CounterChild, key: str) -> list[object]:
    """Three increments in one flush: 1 under ``key`` (fingerprint "f"), 10
    under another key, 100 without one; each one's receipt or error."""
    return list(
        await asyncio.gather(
            reg.increment(child, 1, key=key, fingerprint="f"),
            reg.increment(child, 10, key="k-other", fingerprint="g"),
            reg.increment(child, 100),
            return_exceptions=True,
        )
    )


@pytest.mark.g2
def test_a_key_being_recorded_elsewhere_fails_only_its_own_request(path: Path) -> None:
    store = BusyKeyStore(path)
    store.busy = "k-busy"
    reg = Registry(store, "node-1", flush_interval=None)
    try:
        child = reg.counter("c_total", "", ["k"]).labels("a")
        busy, other, plain = asyncio.run(one_flush_of_three(reg, child, "k-busy"))
        assert isinstance(busy, OutcomeUnknown) and "another node" in str(busy)
        assert isinstance(other, keepcount.Receipt) and isinstance(plain, keepcount.Receipt)
        assert child.value == 110, "the flush went on without the busy key"
    finally:
        reg.close()
    assert durable(path) == {'["a"]': 110}


class UndecidedKeyStore(SQLiteStore):
    """A real SQLite store that cannot decide, once, who holds one key (what
    the Cassandra store reports when that key's lightweight transaction, or
    the read of its owner's record, timed out while a replica was dead and
    not yet convicted): the write that carries it writes nothing."""

    undecided = ""

    def write(self, node: str, epoch: int, families: Sequence[FamilyDef],
              series: Sequence[SeriesRow], keys: Sequence[KeyRecord] = ()) -> None:  # fmt: skip
        if any(k.key == self.undecided for k in keys):
            key, self.undecided = self.undecided, ""
            raise KeyConflict("injected: owner undecided", undecided=[key])
        super().write(node, epoch, families, series, keys)


@pytest.mark.g2
def test_an_undecided_key_fails_only_its_own_request_and_stays_queued(path: Path) -> None:
    """The flush writes every other key; the undecided increment is not
    acknowledged, stays queued with its token, and its retry on this node
    is acknowledged by the next flush, counted once."""
    store = UndecidedKeyStore(path)
    store.undecided = "k-slow"
    reg = Registry(store, "node-1", flush_interval=None)
    try:
        child = reg.counter("c_total", "", ["k"]).labels("a")
        slow, other, plain = asyncio.run(one_flush_of_three(reg, child, "k-slow"))
        assert isinstance(slow, OutcomeUnknown) and "could not decide" in str(slow)
        assert isinstance(other, keepcount.Receipt) and isinstance(plain, keepcount.Receipt)
        assert child.value == 110, "the flush went on without the undecided key"
        assert durable(path) == {'["a"]': 110}

        async def retry() -> keepcount.Receipt:
            return await reg.increment(child, 1, key="k-slow", fingerprint="f")

        first, again = asyncio.run(retry()), asyncio.run(retry())
        assert (first.value, first.replayed) == (111, False)
        assert (again.value, again.replayed) == (111, True)
        assert child.value == 111
    finally:
        reg.close()
    assert durable(path) == {'["a"]': 111}


@pytest.mark.g2
def test_an_undecided_refusal_is_in_flight_and_then_settled(path: Path) -> None:
    """A settle whose refusal the store could not decide answers in_flight
    and keeps the refusal queued; asking again writes it: not_applied."""
    store = UndecidedKeyStore(path)
    store.undecided = "k-gone"
    reg = Registry(store, "node-1", flush_interval=None)
    try:
        first = asyncio.run(reg.settle_key("k-gone"))
        second = asyncio.run(reg.settle_key("k-gone"))
    finally:
        reg.close()
    assert first.status is SettleStatus.IN_FLIGHT
    assert second.status is SettleStatus.NOT_APPLIED
