"""keepcount.prometheus registries on a real SQLite store, in one process.

Two registries opened on one store and host id take two slots, as two
workers would: enough to check how a host's slots combine per metric type
and gauge mode, what binding on first use opens (nothing before it), and
what survives a registry closed and opened again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import keepcount.prometheus as kp
from keepcount.errors import InvalidInput
from keepcount.slots import held_slots, lock_dir


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/c.db"


@pytest.fixture
def regs(url: str) -> Iterator[list[kp.CollectorRegistry]]:
    made: list[kp.CollectorRegistry] = []
    yield made
    for reg in made:
        reg.close()


def samples(reg: kp.CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = kp.generate_latest(reg).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def worker(url: str, regs: list[kp.CollectorRegistry], value: float) -> dict[str, object]:
    """One "worker": a registry of host h with a gauge per mode, all set to ``value``."""
    reg = kp.CollectorRegistry(store=url, node="h", flush_interval=None)
    regs.append(reg)
    metrics: dict[str, object] = {
        mode: kp.Gauge(f"g_{mode}", mode, registry=reg, multiprocess_mode=mode)
        for mode in sorted(kp.Gauge._MULTIPROC_MODES)
    }
    metrics["count"] = kp.Counter("hits", "Hits", ["route"], registry=reg)
    for mode, gauge in metrics.items():
        if mode != "count":
            gauge.set(value)  # type: ignore[attr-defined]
    metrics["count"].labels("/").inc(value)  # type: ignore[attr-defined]
    reg.commit_sync()
    return metrics


@pytest.mark.g5
def test_a_host_s_slots_combine_per_gauge_mode(url: str, regs: list[kp.CollectorRegistry]) -> None:
    worker(url, regs, 10.0)
    worker(url, regs, 12.0)
    assert [r.keepcount.node for r in regs if r.keepcount] == ["h", "h@1"]
    got = samples(regs[0])
    assert got[("hits_total", (("route", "/"),))] == 22.0
    for mode, expected in [("sum", 22.0), ("min", 10.0), ("max", 12.0), ("mostrecent", 12.0)]:
        assert got[(f"g_{mode}", ())] == expected, mode
        assert got[(f"g_live{mode}", ())] == expected, mode
    for mode in ("all", "liveall"):
        assert got[(f"g_{mode}", (("pid", "h"),))] == 10.0
        assert got[(f"g_{mode}", (("pid", "h@1"),))] == 12.0
    assert samples(regs[1]) == got  # whichever worker answers


@pytest.mark.g5
def test_a_dead_slot_keeps_its_counts_and_leaves_the_live_modes(
    url: str, regs: list[kp.CollectorRegistry]
) -> None:
    worker(url, regs, 10.0)
    script = (
        "import sys, keepcount.prometheus as kp\n"
        "reg = kp.CollectorRegistry(store=sys.argv[1], node='h')\n"
        "for m in sorted(kp.Gauge._MULTIPROC_MODES):\n"
        "    kp.Gauge('g_' + m, m, registry=reg, multiprocess_mode=m).set(30)\n"
        "kp.Counter('hits', 'Hits', ['route'], registry=reg).labels('/').inc(5)\n"
        "reg.commit_sync(); print(reg.keepcount.node, flush=True); sys.stdin.read()\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    ) as proc:
        try:
            assert proc.stdout is not None
            slot = proc.stdout.readline().decode().strip()
            assert slot == "h@1"
            assert held_slots(lock_dir(url), "h") == {"h", "h@1"}
            assert samples(regs[0])[("g_livemax", ())] == 30.0
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert held_slots(lock_dir(url), "h") == {"h"}
    got = samples(regs[0])
    assert got[("hits_total", (("route", "/"),))] == 15.0  # a dead worker's counts stay
    assert got[("g_max", ())] == 30.0 and got[("g_sum", ())] == 40.0
    assert got[("g_livemax", ())] == 10.0 and got[("g_livesum", ())] == 10.0
    assert ("g_liveall", (("pid", "h@1"),)) not in got
    assert got[("g_all", (("pid", "h@1"),))] == 30.0
    # The next process in the slot restores the counts, not the live gauges.
    successor = worker(url, regs, 0.0)
    assert regs[-1].keepcount is not None and regs[-1].keepcount.node == "h@1"
    got = samples(regs[0])
    assert got[("hits_total", (("route", "/"),))] == 15.0
    assert got[("g_livesum", ())] == 10.0 and got[("g_sum", ())] == 10.0  # set() wins
    assert successor


def test_nothing_is_opened_before_first_use(url: str, tmp_path: Path) -> None:
    reg = kp.CollectorRegistry(store=url, node="h")
    try:
        c = kp.Counter("jobs", "Jobs", registry=reg)
        kp.Gauge("queue", "Queue", ["q"], registry=reg).labels("a")
        assert not os.path.exists(tmp_path / "c.db")  # declared, made: no store, no slot
        assert reg.keepcount is not None and not reg.keepcount._started
        c.inc()
        reg.commit_sync()
        assert reg.keepcount.node == "h" and os.path.exists(tmp_path / "c.db")
    finally:
        reg.close()


@pytest.mark.g3
def test_counts_before_configure_are_kept_and_added_to_the_slot(url: str) -> None:
    first = kp.CollectorRegistry(store=url, node="h")
    kp.Counter("jobs", "Jobs", registry=first).inc(3)
    first.close()
    reg = kp.CollectorRegistry()  # in memory, as REGISTRY before configure()
    try:
        jobs = kp.Counter("jobs", "Jobs", registry=reg)
        jobs.inc(2)
        reg.configure(url, node="h")
        jobs.inc()
        assert samples(reg)[("jobs_total", ())] == 6.0
        with pytest.raises(InvalidInput, match="bound to"):
            reg.configure(url, node="h")
    finally:
        reg.close()


@pytest.mark.g3
def test_restart_restores_everything_durable(url: str) -> None:
    def declare(reg: kp.CollectorRegistry) -> list[object]:
        return [
            kp.Counter("c", "C", ["a"], registry=reg),
            kp.Histogram("h", "H", registry=reg, buckets=(1, 2)),
            kp.Summary("s", "S", registry=reg),
            kp.Info("i", "I", registry=reg),
            kp.Enum("e", "E", states=["x", "y"], registry=reg),
            kp.Gauge("g", "G", ["a"], registry=reg, multiprocess_mode="livesum"),
        ]

    reg = kp.CollectorRegistry(store=url, node="h")
    c, h, s, i, e, g = declare(reg)
    c.labels("1").inc(1.5)  # type: ignore[attr-defined]
    c.labels("2").inc()  # type: ignore[attr-defined]
    c.remove("2")  # type: ignore[attr-defined]
    h.observe(1.5)  # type: ignore[attr-defined]
    s.observe(-2)  # type: ignore[attr-defined]
    i.info({"v": "1"})  # type: ignore[attr-defined]
    e.state("y")  # type: ignore[attr-defined]
    g.labels("1").inc(4)  # type: ignore[attr-defined]
    before = samples(reg)
    reg.close()
    again = kp.CollectorRegistry(store=url, node="h")
    try:
        declare(again)
        after = samples(again)
    finally:
        again.close()
    live = ("g", (("a", "1"),))
    assert before.pop(live) == 4.0 and live not in after  # a live gauge is not restored
    assert ("c_total", (("a", "2"),)) not in after  # removed stays removed
    assert after == before
