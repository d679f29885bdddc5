"""One ``keepcount verify`` run: a cluster, a workload, a nemesis, a verdict.

1. A local cluster comes up in ``directory/cluster`` (the supervisor: nodes,
   load balancer, coordinator, store — see ``keepcount.cluster``).
2. The workload (``verify.workload``) and the nemesis (``verify.nemesis``)
   run for ``duration`` seconds; every operation goes to
   ``directory/history.jsonl`` as it happens.
3. The nemesis stops, the cluster is healed (every node ready), every keyed
   increment left unknown is settled with its key, and a final read is taken.
4. The checkers judge the history (``verify.checker``); the report goes to
   ``directory/report.html``; the cluster is torn down.

The verifier judges the product from outside: through the load balancer,
each node's HTTP API and process signals (DESIGN §4).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from keepcount.verify.checker import Result, check
from keepcount.verify.history import HistoryWriter, read_history
from keepcount.verify.verdict import compose

__all__ = ["MUTANTS", "Options", "Verdict", "verify"]

MUTANTS = ("ack-before-durable", "wall-clock-lease", "settle-without-refusal")
"""Deliberately broken nodes (``keepcount node --unsafe-<mutant>``) that a run must judge invalid."""


@dataclass
class Options:
    directory: Path
    duration: float = 60.0
    clients: int = 8
    keyed: float = 0.5
    abandon: float = 0.25
    """Share of keyed increments whose client abandons them in doubt and
    settles their key instead (``verify.workload``)."""
    abandon_deadline: float = 0.02
    """Seconds an impatient client waits for its one attempt before it is in
    doubt (``verify.workload.ABANDON_DEADLINE``)."""
    faults: tuple[str, ...] = ("kill", "pause", "coordinator")
    store: str = "sqlite"
    coordinator: str = "etcd"
    lb: str = "haproxy"
    nodes: int = 3
    seed: int = 0
    quiet: float = 4.0
    mutant: str | None = None
    """``ack-before-durable`` or ``wall-clock-lease``: run deliberately broken
    nodes (the mutation tests)."""
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class Verdict:
    valid: bool | None
    report: Path
    results: dict[str, Result]
    operations: int
    faults: int
    unavailable: dict[str, str]


async def verify(opts: Options, log: Callable[[str], None] = print) -> Verdict:
    from keepcount.cluster import partition
    from keepcount.cluster.spec import ClusterSpec
    from keepcount.cluster.supervisor import Supervisor
    from keepcount.verify.nemesis import Nemesis
    from keepcount.verify.report import write_report
    from keepcount.verify.workload import Workload

    directory = opts.directory.resolve()
    cluster_dir = directory / "cluster"
    if cluster_dir.exists():
        shutil.rmtree(cluster_dir)
    directory.mkdir(parents=True, exist_ok=True)
    for old in ("history.jsonl", "results.json", "report.html"):  # a new run, not an append
        (directory / old).unlink(missing_ok=True)
    node_args = [f"--unsafe-{opts.mutant}"] if opts.mutant in MUTANTS else []
    spec = ClusterSpec.allocate(
        cluster_dir, nodes=opts.nodes, lb=opts.lb, coordinator=opts.coordinator,
        store=None if opts.store == "sqlite" else opts.store,
        extra={"node_args": node_args, "clocks": "clock" in opts.faults},
    )  # fmt: skip
    spec.save()
    sup = Supervisor(spec, api=False)
    if "partition" in opts.faults and partition.unavailable() is None:
        sup.partitions = partition.Partitions.create()  # nodes join their cgroups at spawn
    sup_task = asyncio.create_task(sup.run(), name="keepcount-verify-cluster")
    history_file = directory / "history.jsonl"
    writer = HistoryWriter(history_file)
    try:
        log(f"verify: starting {opts.nodes} nodes ({opts.lb}, {opts.coordinator}, {opts.store})")
        await _until(sup.ready.is_set, sup_task, 240, "the cluster did not start")

        def nodes() -> dict[str, tuple[str, int]]:
            out = {}
            for name, ns in sup.nodes.items():
                cur = ns.current
                if cur is not None and cur.ready:
                    out[name] = (cur.process.url, cur.pid)
            return out

        workload = Workload(spec.lb_url, writer, nodes, clients=opts.clients, keyed=opts.keyed,
                            abandon=opts.abandon, abandon_deadline=opts.abandon_deadline,
                            seed=opts.seed)  # fmt: skip
        nemesis = Nemesis(sup, opts.faults, opts.seed, lambda: time.monotonic() - workload.started,
                          quiet=opts.quiet, log=log)  # fmt: skip
        for kind, why in nemesis.unavailable.items():
            log(f"verify: fault {kind!r} not available here: {why}")
        stop_load = asyncio.Event()
        stop_faults = asyncio.Event()
        load_task = asyncio.create_task(workload.run(stop_load))
        nemesis_task = asyncio.create_task(nemesis.run(stop_faults))
        log(f"verify: {opts.clients} clients, faults {list(nemesis.runnable)}, "
            f"{opts.duration:g} s (seed {opts.seed})")  # fmt: skip
        await _progress(opts.duration, workload, nemesis, log)
        stop_faults.set()
        await nemesis_task
        log("verify: healing the cluster")
        await nemesis.heal()
        stop_load.set()
        await load_task
        unresolved = await workload.settle(time.monotonic() + 60)
        log(f"verify: settled; {unresolved} keyed increments left unknown; abandoned keys "
            f"settled {workload.settled['applied']} applied, "
            f"{workload.settled['not_applied']} not applied")  # fmt: skip
    finally:
        writer.close()
        sup.stop()
        try:
            await asyncio.wait_for(sup_task, 120)
        except Exception as exc:  # the verdict still stands; say so
            log(f"verify: the cluster did not stop cleanly: {exc}")
        if sup.partitions is not None:
            sup.partitions.close()
    history = read_history(history_file)
    results = check(history, nemesis.faults)
    for judged in (nemesis.clock_result(), nemesis.corrupt_result()):
        if judged is not None:  # a judgement of the fault itself, beside the history's
            results[judged.name] = judged
            results["valid"] = compose(r for name, r in results.items() if name != "valid")
    settings = {
        **{k: v for k, v in asdict(opts).items() if k not in ("settings", "directory")},
        "directory": str(directory),
        "operations": len(history),
        "unavailable_faults": nemesis.unavailable,
        "clock_jumps": nemesis.jumps,
        "flips": len(nemesis.flips),
        "store_url": sup.store_url,
        **opts.settings,
    }
    report = write_report(directory, history, nemesis.faults, results, settings)
    return Verdict(results["valid"].valid, report, results, len(history), len(nemesis.faults),
                   nemesis.unavailable)  # fmt: skip


async def _until(
    cond: Callable[[], bool], task: asyncio.Task[None], timeout: float, what: str
) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if task.done():
            task.result()
            raise RuntimeError(f"{what}: the cluster's supervisor stopped")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout:g} s")
        await asyncio.sleep(0.05)


async def _progress(
    duration: float, workload: Any, nemesis: Any, log: Callable[[str], None]
) -> None:
    """Wait ``duration`` seconds, saying how it goes every few seconds."""
    end = time.monotonic() + duration
    step = max(5.0, duration / 12)
    while (left := end - time.monotonic()) > 0:
        await asyncio.sleep(min(step, left))
        log(f"verify: {duration - max(left - step, 0):5.0f} s  {workload.acked:,} acknowledged, "
            f"{workload.attempts:,} attempts, {len(nemesis.faults)} faults")  # fmt: skip
