"""``keepcount demo``: counters surviving kill -9, shown against a client tally.

Runs a writer process (``keepcount.writer``: concurrent writers that commit
every increment) on the embedded SQLite store, SIGKILLs it at random moments,
restarts it, and after each restart holds what it restored against what its
writers were acknowledged and what they attempted.  Ends with a graceful stop,
a table of the final values and a report (JSON and Markdown) in ``--dir``.
Exits 1 if any value broke the bounds.
"""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table

import keepcount
from keepcount.writer import COUNTER, HISTOGRAM, Tally, WriterProcess

NODE = "node-1"


@click.command()
@click.option("--dir", "workdir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("keepcount-demo"), show_default=True,
              help="Where the store, logs and report go (the store is started afresh).")  # fmt: skip
@click.option("--kills", type=click.IntRange(1, 1000), default=6, show_default=True,
              help="How many times the writer process is killed with SIGKILL.")  # fmt: skip
@click.option("--writers", type=click.IntRange(1, 256), default=16, show_default=True,
              help="Concurrent writers (asyncio tasks) in the process.")  # fmt: skip
@click.option("--seed", type=int, default=None, help="Seed for the kill schedule.")
def demo(workdir: Path, kills: int, writers: int, seed: int | None) -> None:
    """Show counters surviving kill -9: restored values vs the clients' tally."""
    console = Console()
    workdir.mkdir(parents=True, exist_ok=True)
    for old in workdir.glob("counters.db*"):
        if old.is_dir():
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
        else:
            old.unlink()
    url = f"sqlite:///{workdir.resolve()}/counters.db"
    seed = random.randrange(2**32) if seed is None else seed
    rnd = random.Random(seed)
    console.print(
        f"[bold]keepcount demo[/]: {writers} writers commit every increment to {url};\n"
        f"the process is killed with SIGKILL {kills} times, then stopped cleanly (seed {seed})."
    )
    tally, runs, violations = Tally(), [], []
    table = _table()
    with Live(table, console=console, refresh_per_second=8):
        for run in range(kills + 1):
            last = run == kills
            target = rnd.randint(2000, 6000)
            w = WriterProcess(url, NODE, writers=writers, seconds=60, seed=rnd.randrange(2**32))
            acks, restored_ok, started = 0, True, time.monotonic()
            acked_before, tried_before = sum(tally.acked.values()), sum(tally.tried.values())
            for line in w.lines():
                kind = line.split()[0]
                if kind == "ready":
                    bad = tally.violations(w.restored)
                    violations += bad
                    restored_ok = not bad
                tally.feed(line)
                acks += kind == "ack"
                if kind == "ack" and acks == target:
                    w.kill(signal.SIGTERM if last else signal.SIGKILL)
            code = w.wait()
            restored = sum(v for v, _ in w.restored.values())
            runs.append({
                "run": run + 1, "pid": w.pid, "epoch": w.epoch, "restored": restored,
                "restored_within_bounds": restored_ok, "acked_this_run": acks,
                "ended_by": "SIGTERM (clean stop)" if last else "SIGKILL",
                "exit_code": code, "seconds": round(time.monotonic() - started, 2),
            })  # fmt: skip
            table.add_row(
                str(run + 1), str(w.pid), str(w.epoch), f"{acked_before:,}", f"{restored:,}",
                f"{tried_before:,}", "[green]✓[/]" if restored_ok else "[red]✗[/]", f"{acks:,}",
                "SIGTERM" if last else "[red]kill -9[/]",
            )  # fmt: skip
            if code not in (0, -signal.SIGKILL):
                raise click.ClickException(f"writer exited with {code}:\n{w.stderr}")

    with keepcount.open(url, node=NODE) as reg:
        counter, hist = reg.get(COUNTER), reg.get(HISTOGRAM)
        final = {k[0]: (v, dict(hist.items())[k].count) for k, v in counter.items()}  # type: ignore[union-attr]
    violations += tally.violations(final)
    console.print()
    console.print(_final_table(tally, final))
    report = _report(workdir, url, seed, runs, tally, final, violations)
    if violations:
        console.print("[bold red]FAILED[/]: " + "; ".join(violations))
        console.print(f"report: {report}")
        raise SystemExit(1)
    console.print(
        f"[bold green]OK[/]: after {kills} kills, every acknowledged increment was restored "
        f"({sum(tally.acked.values()):,} acknowledged, {sum(v for v, _ in final.values()):,} "
        f"stored, {tally.failed_ops} refused).\nreport: {report}"
    )


def _table() -> Table:
    t = Table(title="incarnations of node-1: acked before ≤ restored ≤ attempted before")
    cols = ("run", "pid", "epoch", "acked before", "restored", "attempted before", "ok",
            "acks in run", "ended by")  # fmt: skip
    for col in cols:
        t.add_column(col, justify="right")
    return t


def _final_table(tally: Tally, final: dict[str, tuple[int, int]]) -> Table:
    t = Table(title="final values: acknowledged ≤ stored ≤ attempted")
    for col in ("writer", "acknowledged", "stored", "attempted", "ok"):
        t.add_column(col, justify="right")
    for w in sorted(tally.tried, key=lambda s: int(s[1:])):
        lo, value, hi = tally.acked.get(w, 0), final.get(w, (0, 0))[0], tally.tried[w]
        ok = "[green]✓[/]" if lo <= value <= hi else "[red]✗[/]"
        t.add_row(w, f"{lo:,}", f"{value:,}", f"{hi:,}", ok)
    return t


def _report(workdir: Path, url: str, seed: int, runs: list[dict[str, Any]], tally: Tally,
            final: dict[str, tuple[int, int]], violations: list[str]) -> Path:  # fmt: skip
    data = {
        "store": url, "seed": seed, "runs": runs, "violations": violations,
        "writers": {
            w: {"acknowledged": tally.acked.get(w, 0), "stored": final.get(w, (0, 0))[0],
                "attempted": tally.tried[w]}
            for w in sorted(tally.tried)
        },
    }  # fmt: skip
    (workdir / "report.json").write_text(json.dumps(data, indent=2))
    lines = [
        "# keepcount demo report", "", f"store `{url}`, seed {seed}", "",
        "| run | pid | epoch | restored | within bounds | acks | ended by |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    lines += [
        f"| {r['run']} | {r['pid']} | {r['epoch']} | {r['restored']} | "
        f"{r['restored_within_bounds']} | {r['acked_this_run']} | {r['ended_by']} |"
        for r in runs
    ]
    lines += ["", "| writer | acknowledged | stored | attempted |", "|---|---|---|---|"]
    lines += [
        f"| {w} | {v['acknowledged']} | {v['stored']} | {v['attempted']} |"
        for w, v in data["writers"].items()  # type: ignore[attr-defined]
    ]
    lines += ["", "verdict: " + ("FAILED: " + "; ".join(violations) if violations else "OK")]
    path = workdir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
