"""The registry on a real SQLite file: restore, definitions, several nodes per file."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

import keepcount
from keepcount import DefinitionConflict, HistogramValue, RegistryClosed


@pytest.mark.g3
def test_values_come_back_after_close_and_reopen(db_url: str) -> None:
    with keepcount.open(db_url, node="node-1") as reg:
        hits = reg.counter("http_requests_total", "Requests", ["route", "status"])
        hits.labels(route="/", status="200").inc(41)
        hits.labels("/", 500).inc()
        lat = reg.histogram("latency_seconds", "Latency", ["route"], buckets=[0.1, 1])
        lat.labels("/").observe(0.05)
        lat.labels("/").observe(3)
        epoch = reg.epoch
    with keepcount.open(db_url, node="node-1") as reg:
        assert reg.epoch == epoch + 1
        assert reg.restored_series == 3
        hits = reg.counter("http_requests_total", "Requests", ["route", "status"])
        assert hits.labels("/", "200").value == 41
        assert dict(hits.items()) == {("/", "200"): 41, ("/", "500"): 1}
        assert reg.histogram("latency_seconds", "Latency", ["route"], buckets=[0.1, 1]).labels(
            "/"
        ).value == HistogramValue([1, 0, 1], 3.05)


@pytest.mark.g3
def test_restored_families_exist_before_they_are_declared(db_url: str) -> None:
    with keepcount.open(db_url, node="node-1") as reg:
        reg.counter("jobs_total", "Jobs", ["queue"]).labels("mail").inc(3)
    with keepcount.open(db_url, node="node-1") as reg:
        fam = reg.get("jobs_total")
        assert fam is not None and fam.help == "Jobs"
        assert list(fam.items()) == [(("mail",), 3)]


@pytest.mark.g6
def test_redeclaring_with_another_shape_is_refused(db_url: str) -> None:
    with keepcount.open(db_url, node="node-1") as reg:
        reg.counter("jobs_total", "Jobs", ["queue"]).labels("mail").inc()
    with keepcount.open(db_url, node="node-1") as reg:
        with pytest.raises(DefinitionConflict, match="labels \\['queue'\\]"):
            reg.counter("jobs_total", "Jobs", ["queue", "host"])
        with pytest.raises(DefinitionConflict):
            reg.histogram("jobs_total", "Jobs", ["queue"])
        assert reg.counter("jobs_total", "Jobs again", ["queue"]).labels("mail").value == 1


def test_help_changes_are_kept(db_url: str) -> None:
    with keepcount.open(db_url, node="node-1") as reg:
        reg.counter("jobs_total", "old").inc()
    with keepcount.open(db_url, node="node-1") as reg:
        reg.counter("jobs_total", "new").inc()
    with keepcount.open(db_url, node="node-1") as reg:
        assert reg.get("jobs_total").help == "new"  # type: ignore[union-attr]


@pytest.mark.g5
def test_nodes_sharing_a_file_write_concurrently_and_sum_in_cluster_totals(db_url: str) -> None:
    regs = [keepcount.open(db_url, node=f"node-{i}", flush_interval=None) for i in range(4)]

    def work(reg: keepcount.Registry) -> None:
        c = reg.counter("hits_total", "", ["route"])
        for i in range(300):
            c.labels(f"/{i % 3}").inc()
            if i % 10 == 0:
                reg.commit_sync()
        reg.commit_sync()

    threads = [threading.Thread(target=work, args=(r,)) for r in regs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    totals = {t.labels["route"]: t for t in regs[0].cluster("hits_total")}
    assert {k: t.value for k, t in totals.items()} == {"/0": 400, "/1": 400, "/2": 400}
    assert totals["/0"].nodes == {f"node-{i}": 100 for i in range(4)}
    for r in regs:
        r.close()
    with keepcount.open(db_url, node="reader") as reg:  # released nodes still count
        assert sum(t.value for t in reg.cluster()) == 1200  # type: ignore[misc]


@pytest.mark.g1
def test_async_commit_from_many_tasks(db_url: str) -> None:
    async def main() -> None:
        async with keepcount.open(db_url, node="node-1", flush_interval=None) as reg:
            c = reg.counter("c_total", "", ["w"])

            async def writer(w: int) -> None:
                for _ in range(50):
                    c.labels(str(w)).inc()
                    await reg.commit()

            await asyncio.gather(*(writer(w) for w in range(32)))
            assert reg.flushes < 32 * 50, "waiters shared flushes"

    asyncio.run(main())
    with keepcount.open(db_url, node="node-1") as reg:
        assert sum(v for _, v in reg.get("c_total").items()) == 32 * 50  # type: ignore[union-attr]


@pytest.mark.g6
def test_restored_label_sets_count_against_the_child_limit(db_url: str) -> None:
    with keepcount.open(db_url, node="node-1") as reg:
        c = reg.counter("c_total", "", ["k"])
        for i in range(5):
            c.labels(str(i)).inc()
    with keepcount.open(db_url, node="node-1", max_children=5) as reg:
        c = reg.counter("c_total", "", ["k"])
        assert len(c) == 5
        with pytest.raises(keepcount.CardinalityError):
            c.labels("new")
        c.labels("3").inc()  # a restored one is not new
        assert c.labels("3").value == 2


@pytest.mark.g6
def test_closed_registry_refuses_work(tmp_path: Path) -> None:
    reg = keepcount.open(f"sqlite:///{tmp_path}/c.db", node="node-1")
    reg.close()
    reg.close()  # idempotent
    with pytest.raises(RegistryClosed):
        reg.counter("x_total")
    with pytest.raises(RegistryClosed):
        reg.commit_sync()
