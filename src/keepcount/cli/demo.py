"""``keepcount demo``: a cluster that loses nodes and no acknowledged increment.

Brings up a local cluster (``keepcount.cluster.supervisor``: 3 nodes on the
embedded SQLite store, HAProxy, etcd, the failure detector), drives keyed
increments through the load balancer with clients that tally every
acknowledgement (``keepcount.cluster.workload``), and meanwhile:

1. SIGKILLs a node: the balancer routes around it, the detector restarts it,
   it restores its counters, then turns ready;
2. pauses a node (SIGSTOP) past its claim's TTL: the detector starts a new
   incarnation on the node's other slot; the old process is then continued
   (SIGCONT) — a zombie — and stops by itself, having acknowledged nothing
   more (its late writes are fenced by the newer epoch);
3. SIGKILLs nodes twice more.

It prints each step as it happens, then the client tally against the
cluster's totals (equal: nothing lost, nothing counted twice), writes a
report (``report.md``, ``report.json``, ``node_counters.png``: each node's
counter across its restarts) and tears everything down.  Exit status 1 if
the totals differ or a node did not come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table

from keepcount.cli.extras import coordinator_modules, needs_extra, require

if TYPE_CHECKING:
    import aiohttp

    from keepcount.cluster.faults import Fault

__all__ = ["demo"]

COUNTER = "demo_orders_total"
LABEL_SETS = [{"shop": s, "channel": c} for s in ("paris", "lyon") for c in ("web", "app")]
SAMPLE_EVERY = 0.2
SAMPLE_TIMEOUT = 1.0
"""Seconds a node has to answer a sample (else the sample is skipped)."""
TOTALS_TIMEOUT = 60.0
"""Seconds the final read of the cluster totals may take (the session's deadline)."""


@dataclass
class Samples:
    """Each node's counter value over time, as the node itself answers it."""

    points: dict[str, list[tuple[float, int, int]]] = field(default_factory=dict)
    """node -> (time.time(), value, incarnation)."""


@click.command()
@click.option("--dir", "workdir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("keepcount-demo"), show_default=True,
              help="Where the cluster (started afresh), logs and report go.")  # fmt: skip
@click.option("--nodes", type=click.IntRange(2, 9), default=3, show_default=True)
@click.option("--lb", type=click.Choice(["haproxy", "nginx"]), default="haproxy", show_default=True)
@click.option("--coordinator", type=click.Choice(["etcd", "zookeeper"]), default="etcd",
              show_default=True)  # fmt: skip
@click.option("--clients", type=click.IntRange(1, 256), default=16, show_default=True,
              help="Concurrent clients sending keyed increments through the balancer.")  # fmt: skip
@click.option("--steady", type=click.FloatRange(0.5, 60), default=3.0, show_default=True,
              help="Seconds of undisturbed load before, between and after the faults.")  # fmt: skip
@click.option("--seed", type=int, default=None, help="Seed for the victims and the load.")
@click.option("--linger", type=click.FloatRange(0, 3600), default=0.0, show_default=True,
              help="Seconds the cluster and its live page stay up after the verdict "
              "(Ctrl-C ends sooner).")  # fmt: skip
def demo(
    workdir: Path, nodes: int, lb: str, coordinator: str, clients: int, steady: float,
    seed: int | None, linger: float,
) -> None:  # fmt: skip
    """Kill and pause nodes of a live cluster; show that no acknowledged increment is lost."""
    with needs_extra("demo", "cluster"):
        require("demo", "cluster", *coordinator_modules(coordinator), "matplotlib")
        console = Console()
        seed = random.randrange(2**32) if seed is None else seed
        workdir = workdir.resolve()
        ok = asyncio.run(
            _demo(console, workdir, nodes, lb, coordinator, clients, steady, seed, linger)
        )
    if not ok:
        raise SystemExit(1)


async def _demo(
    console: Console, workdir: Path, nodes: int, lb: str, coordinator: str, clients: int,
    steady: float, seed: int, linger: float = 0.0,
) -> bool:  # fmt: skip
    from keepcount.cluster.faults import FaultError, kill, pause, until
    from keepcount.cluster.spec import ClusterSpec
    from keepcount.cluster.supervisor import Supervisor
    from keepcount.cluster.workload import KeyedLoad
    from keepcount.httpclient import new_session

    rnd = random.Random(seed)
    cdir = workdir / "cluster"
    if cdir.exists():
        shutil.rmtree(cdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec = ClusterSpec.allocate(cdir, nodes=nodes, lb=lb, coordinator=coordinator)
    spec.save()
    started = time.time()

    def elapsed() -> str:
        return f"[dim]{time.time() - started:6.1f} s[/]"

    def on_event(ev: dict[str, Any]) -> None:
        line = _describe(ev)
        if line is not None:
            console.print(f"{elapsed()}  {line}")

    console.print(
        f"[bold]keepcount demo[/] — live page: [bold]{spec.api_url}/ui[/] "
        "(up once the cluster starts, in a few seconds; it follows the cluster while the "
        "demo kills nodes)"
    )
    console.print(
        f"seed {seed}: {nodes} nodes behind {lb}, claims in {coordinator}, counters in {spec.store}"
    )
    sup = Supervisor(spec, on_event=on_event)
    sup_task = asyncio.create_task(sup.run(), name="keepcount-supervisor")
    faults: list[Fault] = []
    samples = Samples()
    load = KeyedLoad(spec.lb_url, COUNTER, LABEL_SETS, clients=clients, seed=seed)
    stop_load = asyncio.Event()
    stop_sampling = asyncio.Event()
    try:
        try:
            await until(sup.ready.is_set, sup_task, 120, "the cluster did not start")
        except FaultError as exc:
            raise click.ClickException(str(exc)) from None
        console.print(
            f"{elapsed()}  [green]cluster ready[/]: load balancer {spec.lb_url}, "
            f"control API {spec.api_url} (`keepcount cluster status --dir {cdir}`)"
        )
        async with new_session(timeout=TOTALS_TIMEOUT) as session:
            sampler = asyncio.create_task(_sample(session, sup, samples, stop_sampling))
            load_task = asyncio.create_task(load.run(session, stop_load))
            console.print(f"{elapsed()}  {clients} clients send keyed increments through {lb}")
            await asyncio.sleep(steady)  # undisturbed load: the steady-state baseline
            victims = [spec.nodes[i % nodes].id for i in rnd.sample(range(nodes), nodes)]
            schedule = [("kill", victims[0]), ("pause", victims[1 % nodes]),
                        ("kill", victims[2 % nodes]), ("kill", victims[0])]  # fmt: skip

            async def zombie(old: Any) -> None:
                console.print(f"{elapsed()}  waking the old process (pid {old.pid}): a zombie now")

            for kind, node in schedule:
                if kind == "kill":
                    faults.append(await kill(sup, node, sup_task))
                else:
                    faults.append(await pause(sup, node, sup_task, on_replaced=zombie))
                await asyncio.sleep(steady)
            stop_load.set()
            await asyncio.wait_for(load_task, 120)
            stop_sampling.set()
            await sampler
            totals = await _totals(session, spec.lb_url)
        tally = load.tally()
        keys = sorted(set(tally) | set(totals))
        equal = all(tally.get(k, 0) == totals.get(k, 0) for k in keys)
        _print_tally(console, keys, tally, totals, equal)
        recovered = all(f.ready is not None for f in faults)
        stats = _stats(load, faults, started)
        _print_stats(console, faults, stats, load)
        report = _report(workdir, spec, seed, faults, load, tally, totals, equal, stats, samples,
                         sup)  # fmt: skip
        console.print(f"report: {report}")
        verdict = equal and recovered
        console.print(
            "[bold green]OK[/]: every acknowledged increment is in the cluster's totals, "
            "none counted twice"
            if verdict
            else "[bold red]FAILED[/] (see the report)"
        )
        if linger > 0:
            console.print(
                f"the cluster and its live page ({spec.api_url}/ui) stay up for {linger:g} s; "
                "Ctrl-C ends sooner"
            )
            try:
                await asyncio.sleep(linger)
            except asyncio.CancelledError:  # Ctrl-C: tear down, keep the verdict
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
        return verdict
    finally:
        stop_load.set()
        stop_sampling.set()
        sup.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(sup_task, 60)
        console.print(f"{elapsed()}  cluster torn down (logs in {cdir})")


async def _sample(
    session: aiohttp.ClientSession, sup: Any, samples: Samples, stop: asyncio.Event
) -> None:
    from keepcount.httpclient import exchange

    while not stop.is_set():
        for node, ns in sup.nodes.items():
            cur = ns.current
            if cur is None or not cur.ready:
                continue
            url = f"{cur.process.url}/v1/counters/{COUNTER}"
            try:
                status, raw = await exchange(session, "GET", url, timeout=SAMPLE_TIMEOUT)
                if status != 200:
                    continue
                body = json.loads(raw)
            except (OSError, ValueError):
                continue
            value = sum(c["value"] for c in body["counters"])
            samples.points.setdefault(node, []).append((time.time(), value, cur.number))
        await asyncio.sleep(SAMPLE_EVERY)


async def _totals(session: aiohttp.ClientSession, lb_url: str) -> dict[str, int]:
    from keepcount.cluster.workload import labels_key
    from keepcount.httpclient import exchange

    status, raw = await exchange(session, "GET", f"{lb_url}/v1/cluster/counters/{COUNTER}")
    if status == 404:
        return {}
    body = json.loads(raw)
    if status != 200:
        raise click.ClickException(f"reading the totals failed: {status} {body}")
    return {labels_key(c["labels"]): int(c["value"]) for c in body["counters"]}


def _describe(ev: dict[str, Any]) -> str | None:  # noqa: PLR0911 - one line per event kind
    node, kind = ev.get("node"), ev["event"]
    if kind == "signal":
        return f"[bold]{ev['signal']}[/] {node} (pid {', '.join(map(str, ev['pids']))})"
    if kind == "exited":
        how = ev.get("signal") or f"exit {ev['code']}"
        return f"{node} exited ({how}) after {ev['ran']:.1f} s — detected"
    if kind == "evicted":
        return f"{node}: its dead incarnation's claim evicted (epoch {ev['epoch']})"
    if kind == "claim_lost":
        return (f"{node} (pid {ev['pid']}) lost its claim (process state {ev['state']}): "
                "starting a new incarnation on its other slot")  # fmt: skip
    if kind == "started" and ev["incarnation"] > 1:
        return (
            f"{node} restarted: incarnation {ev['incarnation']}, pid {ev['pid']}, slot {ev['slot']}"
        )
    if kind == "ready" and ev.get("first") and ev["incarnation"] > 1:
        return (f"{node} [green]ready[/] {ev['after']:.2f} s after its start, epoch "
                f"{ev['epoch']}, {ev['restored_series']} series restored in "
                f"{ev['restore_seconds'] * 1e3:.0f} ms")  # fmt: skip
    if kind == "stale_exited":
        return f"{node}: the old process (pid {ev['pid']}) stopped by itself, exit {ev['code']}"
    if kind in ("coordinator_ready", "balancer_ready"):
        return f"{ev['kind']} up in {ev['seconds']:.2f} s ({ev['url']})"
    return None


def _stats(load: Any, faults: list[Fault], started: float) -> dict[str, Any]:
    oks = [a.t for a in load.answers if a.status == 200]
    if not oks:
        return {}
    first = faults[0].t0 if faults else oks[-1]
    steady = [t for t in oks if oks[0] + 0.5 <= t < first]
    steady_rate = len(steady) / max(first - oks[0] - 0.5, 1e-9)
    windows = []
    for f in faults:
        n = sum(1 for t in oks if f.t0 <= t < f.end)
        windows.append(n / max(f.end - f.t0, 1e-9))
    return {
        "steady_per_s": round(steady_rate, 1),
        "during_faults_per_s": [round(w, 1) for w in windows],
        "fault_vs_steady": [round(w / steady_rate, 3) if steady_rate else None for w in windows],
    }


def _print_tally(
    console: Console, keys: list[str], tally: dict[str, int], totals: dict[str, int], equal: bool
) -> None:
    table = Table(title=f"{COUNTER}: client tally vs cluster totals", title_justify="left")
    for col in ("labels", "acknowledged to clients", "cluster total", ""):
        table.add_column(col, justify="right" if col != "labels" else "left")
    for k in keys:
        a, b = tally.get(k, 0), totals.get(k, 0)
        labels = ", ".join(f"{n}={v}" for n, v in json.loads(k).items())
        table.add_row(labels, f"{a:,}", f"{b:,}", "[green]=[/]" if a == b else "[red]≠[/]")
    table.add_row("[bold]all[/]", f"[bold]{sum(tally.values()):,}[/]",
                  f"[bold]{sum(totals.values()):,}[/]", "[green]=[/]" if equal else "[red]≠[/]")  # fmt: skip
    console.print(table)


def _print_stats(console: Console, faults: list[Fault], stats: dict[str, Any], load: Any) -> None:
    table = Table(title="faults", title_justify="left")
    for col in ("fault", "node", "LB routed away", "detected", "ready again", "zombie exit",
                "throughput vs steady"):  # fmt: skip
        table.add_column(col)
    ratios = stats.get("fault_vs_steady", [])
    for i, f in enumerate(faults):
        table.add_row(
            "SIGKILL" if f.kind == "kill" else "SIGSTOP past TTL",
            f.node,
            "" if f.lb_down is None else f"{f.lb_down:.2f} s",
            "" if f.detected is None else f"{f.detected:.2f} s",
            "" if f.ready is None else f"{f.ready:.2f} s",
            "" if f.zombie_exit is None else str(f.zombie_exit),
            "" if i >= len(ratios) or ratios[i] is None else f"{ratios[i]:.2f}",
        )
    console.print(table)
    errors = dict(load.errors)
    console.print(
        f"{load.ops:,} increments, {sum(load.acked.values()):,} counted; client-visible "
        f"errors (each retried with its key): {sum(errors.values())} {errors or ''}; "
        f"steady throughput {stats.get('steady_per_s', 0):,.0f}/s"
    )


def _report(
    workdir: Path, spec: Any, seed: int, faults: list[Fault], load: Any, tally: dict[str, int],
    totals: dict[str, int], equal: bool, stats: dict[str, Any], samples: Samples, sup: Any,
) -> Path:  # fmt: skip
    from keepcount.cluster.supervisor import read_events

    events = read_events(spec.directory)
    doc = {
        "seed": seed,
        "nodes": [n.id for n in spec.nodes],
        "lb": spec.lb,
        "coordinator": spec.coordinator,
        "store": spec.store,
        "equal": equal,
        "tally": tally,
        "totals": totals,
        "operations": load.ops,
        "retries": load.retries,
        "client_errors": dict(load.errors),
        "replayed": load.replayed,
        "faults": [f.__dict__ for f in faults],
        "throughput": stats,
        "restarts": {n: ns.restarts for n, ns in sup.nodes.items()},
        "events": events,
    }
    (workdir / "report.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot = _plot(workdir / "node_counters.png", samples, faults, events)
    lines = [
        "# keepcount demo report",
        "",
        f"seed {seed}; {len(spec.nodes)} nodes behind {spec.lb}; claims in {spec.coordinator}; "
        f"store `{spec.store}`.",
        "",
        "| labels | acknowledged | cluster total |",
        "|---|---|---|",
        *[
            f"| `{k}` | {tally.get(k, 0)} | {totals.get(k, 0)} |"
            for k in sorted(set(tally) | set(totals))
        ],
        "",
        "| fault | node | LB routed away (s) | ready again (s) | zombie exit |",
        "|---|---|---|---|---|",
        *[f"| {f.kind} | {f.node} | {f.lb_down} | {f.ready} | {f.zombie_exit} |" for f in faults],
        "",
        f"operations {load.ops}, retries {load.retries}, client-visible errors "
        f"{sum(load.errors.values())} {dict(load.errors)}; throughput {stats}.",
        "",
        f"![each node's counter across its restarts]({plot.name})" if plot else "",
        "",
        f"verdict: {'OK' if equal else 'FAILED'}",
    ]
    (workdir / "report.md").write_text("\n".join(lines) + "\n")
    return workdir / "report.md"


def _plot(
    path: Path, samples: Samples, faults: list[Fault], events: list[dict[str, Any]]
) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not samples.points:
        return None
    t0 = min(p[0] for pts in samples.points.values() for p in pts)
    fig, ax = plt.subplots(figsize=(10, 5))
    for node, pts in sorted(samples.points.items()):
        ax.plot([p[0] - t0 for p in pts], [p[1] for p in pts], label=node, linewidth=1.5)
    for f in faults:
        ax.axvline(f.t0 - t0, color="red" if f.kind == "kill" else "orange", linestyle="--",
                   linewidth=1)  # fmt: skip
        ax.annotate(f"{'kill -9' if f.kind == 'kill' else 'SIGSTOP'} {f.node}",
                    (f.t0 - t0, ax.get_ylim()[1]), rotation=90, va="top", fontsize=8)  # fmt: skip
    for ev in events:
        if ev["event"] == "ready" and ev.get("first") and ev.get("incarnation", 1) > 1:
            ax.axvline(ev["t"] - t0, color="green", linestyle=":", linewidth=1)
    ax.set_xlabel("seconds")
    ax.set_ylabel(f"{COUNTER} (node's own value)")
    ax.set_title("each node's counter across its restarts (red: kill, orange: pause, green: ready)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
