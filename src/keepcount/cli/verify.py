"""``keepcount verify``: a fault-injection run with a history checker (DESIGN §8).

Brings up a local cluster, drives keyed and plain increments, reads and
scrapes through it while a seeded nemesis kills, pauses and cuts off its
parts, then judges the recorded history and writes a report
(``keepcount.verify``).  Prints the verdict and the report's path.

Exit status: 0 valid, 1 invalid (an acknowledged increment lost, a double
count, a value that went backwards), 3 unknown (the history could not tell,
e.g. keyed increments never resolved).
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import click

from keepcount.cli.extras import coordinator_modules, needs_extra, require

__all__ = ["verify"]

EXIT_INVALID = 1
EXIT_UNKNOWN = 3


@click.command()
@click.option("--duration", type=click.FloatRange(5, 24 * 3600), default=60.0, show_default=True,
              help="Seconds of load and faults.")  # fmt: skip
@click.option("--clients", type=click.IntRange(1, 256), default=8, show_default=True)
@click.option("--keyed", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Share of increments that carry an Idempotency-Key.")  # fmt: skip
@click.option("--faults", default="kill,pause,coordinator", show_default=True,
              help="Comma-separated: kill, pause, store (Cassandra replicas), coordinator, "
                   "partition, clock (jump a node's wall clock).")  # fmt: skip
@click.option("--store", type=click.Choice(["sqlite", "cassandra"]), default="sqlite",
              show_default=True,
              help="sqlite: one file shared by the nodes; cassandra: a local 3-node cluster.")  # fmt: skip
@click.option("--coordinator", type=click.Choice(["etcd", "zookeeper"]), default="etcd",
              show_default=True)  # fmt: skip
@click.option("--lb", type=click.Choice(["haproxy", "nginx"]), default="haproxy", show_default=True)
@click.option("--nodes", type=click.IntRange(2, 9), default=3, show_default=True)
@click.option("--seed", type=int, default=None, help="Seed of the workload and the fault schedule.")
@click.option("--quiet", type=click.FloatRange(0.5, 600), default=4.0, show_default=True,
              help="Seconds without faults between two faults.")  # fmt: skip
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              default=Path("keepcount-verify"), show_default=True,
              help="Where the history, the report and the cluster go.")  # fmt: skip
@click.option("--abandon", type=click.FloatRange(0, 1), default=0.25, show_default=True,
              help="Share of keyed increments sent by impatient clients, which give an "
                   "increment up when in doubt and settle its key instead.")  # fmt: skip
@click.option("--abandon-deadline", type=click.FloatRange(0.0005, 10), default=0.02,
              show_default=True,
              help="Seconds an impatient client waits for its one attempt; shorter leaves "
                   "more increments in doubt (and settled).")  # fmt: skip
@click.option("--mutant", type=click.Choice(["ack-before-durable", "wall-clock-lease",
                                             "settle-without-refusal"]),
              default=None, hidden=True,
              help="Run deliberately broken nodes: the run must be judged invalid.")  # fmt: skip
def verify(
    duration: float, clients: int, keyed: float, faults: str, store: str, coordinator: str,
    lb: str, nodes: int, seed: int | None, quiet: float, directory: Path, abandon: float,
    abandon_deadline: float,
    mutant: str | None,
) -> None:  # fmt: skip
    """Inject faults into a live cluster and check its history: no acknowledged
    increment lost, none counted twice, no value going backwards."""
    store_modules = ("cassandra",) if store == "cassandra" else ()
    with needs_extra("verify", "cluster"):
        require("verify", "cluster", *coordinator_modules(coordinator), *store_modules,
                "matplotlib")  # fmt: skip
        from rich.console import Console

        from keepcount.verify.nemesis import KINDS
        from keepcount.verify.run import Options
        from keepcount.verify.run import verify as run

        kinds = tuple(k.strip() for k in faults.split(",") if k.strip())
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown:
            raise click.UsageError(f"unknown fault kinds {unknown}: choose from {', '.join(KINDS)}")
        seed = random.randrange(2**31) if seed is None else seed
        console = Console()
        started = time.monotonic()

        def log(line: str) -> None:
            console.print(f"[dim]{time.monotonic() - started:7.1f} s[/]  {line}", highlight=False)

        opts = Options(
            directory=directory, duration=duration, clients=clients, keyed=keyed, faults=kinds,
            store="cassandra" if store == "cassandra" else "sqlite", coordinator=coordinator, lb=lb,
            nodes=nodes, seed=seed, quiet=quiet, mutant=mutant, abandon=abandon,
            abandon_deadline=abandon_deadline,
        )  # fmt: skip
        verdict = asyncio.run(run(opts, log))
        for name, result in verdict.results.items():
            if name == "valid":
                continue
            mark = {True: "[green]valid[/]", False: "[red]INVALID[/]", None: "[yellow]unknown[/]"}
            console.print(f"  {name:14} {mark[result.valid]}  {result.summary}", highlight=False)
            for error in result.errors[:5]:
                console.print(f"      {error}", highlight=False)
        text = {True: "[bold green]VALID[/]", False: "[bold red]INVALID[/]",
                None: "[bold yellow]UNKNOWN[/]"}[verdict.valid]  # fmt: skip
        console.print(f"verdict: {text} — {verdict.operations:,} operations, "
                      f"{verdict.faults} faults (seed {seed}); report: {verdict.report}")  # fmt: skip
        if verdict.valid is False:
            raise SystemExit(EXIT_INVALID)
        if verdict.valid is None:
            raise SystemExit(EXIT_UNKNOWN)
