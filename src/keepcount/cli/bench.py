"""``keepcount bench``: run the benchmarks of DESIGN §9 and show them as ratios.

Each benchmark prints a table as soon as it finishes, so a long run shows
its results as it goes; ``--out`` also writes everything (with the machine
it ran on) as JSON, the source of BENCHMARKS.md.  Missing targets is not an
error: benchmarks measure, tests assert.  A missing peer (Redis) is.
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from keepcount import __version__
from keepcount.bench import BENCHMARKS, BenchError, BenchResult, Comparison, Settings
from keepcount.bench.machine import describe
from keepcount.bench.redis import require_tools
from keepcount.bench.result import settings_json

__all__ = ["bench"]

_RAM_FILESYSTEMS = ("tmpfs", "ramfs")


@click.command()
@click.argument("which", type=click.Choice([*BENCHMARKS, "all"]), default="all")
@click.option("--quick", is_flag=True, help="Tiny sizes and short runs: a smoke test.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Also write the results as JSON to this file.",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0.1, max=600),
    default=None,
    help="Seconds per throughput measurement (default 5; 0.5 with --quick).",
)
def bench(which: str, quick: bool, out: Path | None, duration: float | None) -> None:
    """Run benchmarks (default: all), each measured side by side with a peer."""
    names = list(BENCHMARKS) if which == "all" else [which]
    if "durable" in names:
        try:
            require_tools()  # before minutes of other benchmarks, not after
        except BenchError as exc:
            raise click.ClickException(str(exc)) from None
    # SIGTERM (a CI timeout, `kill`) must still stop Redis and remove the
    # temp dir: turn it into SystemExit so every `finally` runs.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 120))  # logs and files: no wrapping
    with tempfile.TemporaryDirectory(prefix="keepcount-bench-") as tmp:
        settings = Settings(Path(tmp), quick, duration or (0.5 if quick else 5.0))
        machine = describe(settings.workdir)
        _header(console, machine, settings)
        results = _run_all(console, names, settings)
    console.print(_summary(results))
    if out is not None:
        doc = {
            "keepcount": __version__,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": ["keepcount", *sys.argv[1:]],
            "settings": settings_json(settings),
            "machine": machine,
            "benchmarks": {r.name: r.to_json() for r in results},
        }
        out.write_text(json.dumps(doc, indent=2) + "\n")
        console.print(f"results written to {out}")


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _run_all(console: Console, names: list[str], settings: Settings) -> list[BenchResult]:
    results: list[BenchResult] = []
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        overall = progress.add_task("benchmarks", total=len(names))
        for name in names:
            task = progress.add_task(name, total=None)

            def report(done: int, total: int, text: str, task: Any = task) -> None:
                progress.update(task, completed=done, total=total, description=text)

            started = time.perf_counter()
            try:
                result = BENCHMARKS[name](settings, report)
            except BenchError as exc:
                raise click.ClickException(f"{name}: {exc}") from None
            result.seconds = time.perf_counter() - started
            progress.remove_task(task)
            progress.advance(overall)
            progress.console.print(_table(result))
            results.append(result)
    return results


def _header(console: Console, machine: dict[str, Any], settings: Settings) -> None:
    console.print(
        f"[bold]keepcount {__version__} bench[/bold]"
        f"{' --quick' if settings.quick else ''}: {machine['nproc']} cores, "
        f"{machine['cpu_model']}, Python {machine['python']}, SQLite {machine['sqlite']}"
    )
    console.print(f"data under {settings.workdir} ({machine['workdir_filesystem']})")
    if machine["workdir_filesystem"] in _RAM_FILESYSTEMS:
        console.print(
            "[yellow]warning: the temp dir is in RAM, so fsync costs nothing; "
            "set TMPDIR to a directory on disk for real durable figures[/yellow]"
        )


def _table(result: BenchResult) -> Table:
    table = Table(title=f"{result.title}  ({result.seconds:.1f} s)", title_justify="left")
    for col in ("measure", "keepcount", "peer", "ratio", "target", "met", "note"):
        table.add_column(col, justify="right" if col in ("keepcount", "peer", "ratio") else "left")
    for c in result.comparisons:
        table.add_row(
            c.measure,
            _figure(c.ours, c.unit),
            _figure(c.peer, c.unit),
            f"{c.ratio:.2f}x",
            "" if c.target is None else str(c.target),
            _met(c),
            c.note,
        )
    peers = sorted({c.peer_name for c in result.comparisons})
    notes = ", ".join(f"{k}={_scalar(v)}" for k, v in result.notes.items() if _is_scalar(v))
    table.caption = f"peer: {'; '.join(peers)}" + (f"\n{notes}" if notes else "")
    table.caption_justify = "left"
    return table


def _summary(results: list[BenchResult]) -> Table:
    table = Table(title="targets", title_justify="left")
    for col in ("benchmark", "measure", "keepcount", "ratio", "target", "met"):
        table.add_column(col, justify="right" if col in ("keepcount", "ratio") else "left")
    for r in results:
        for c in r.comparisons:
            if c.target is not None:
                figure, ratio = _figure(c.ours, c.unit), f"{c.ratio:.2f}x"
                table.add_row(r.name, c.measure, figure, ratio, str(c.target), _met(c))
    return table


def _figure(value: float, unit: str) -> str:
    if unit == "ns/op":
        return f"{value:,.0f} ns"
    if unit == "ops/s":
        return f"{value:,.0f}/s"
    if unit == "s":
        return f"{value * 1e3:,.1f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "ms":
        return f"{value:.3f} ms"
    return f"{value:g} {unit}"


def _met(c: Comparison) -> str:
    if c.met is None:
        return ""
    return "[green]met[/green]" if c.met else "[red]not met[/red]"


def _is_scalar(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _scalar(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
