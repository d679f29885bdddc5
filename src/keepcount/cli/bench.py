"""``keepcount bench``: run the benchmarks of DESIGN §9 and show them as ratios.

Each benchmark prints a table as soon as it finishes, so a long run shows
its results as it goes; ``--out`` also writes everything (with the machine
it ran on) as JSON, the source of BENCHMARKS.md.  Missing targets is not an
error: benchmarks measure, tests assert.  A missing peer (Redis) is.

``keepcount bench workers`` (issue 14, not part of ``all``: it builds a
virtual environment for one of its peers and runs for minutes) measures a
Flask app under multi-worker gunicorn with five metrics backends;
``--markdown FILE`` writes its BENCHMARKS.md section.

``keepcount bench prometheus`` (not part of ``all`` either) times
``keepcount.prometheus``'s in-memory calls against prometheus_client's, in
memory and in multiprocess mode.

``keepcount bench cassandra-scale`` (not part of ``all``: it writes a million
series, ~7 min) measures the Cassandra store at scale (issue 17).
"""

from __future__ import annotations

import functools
import json
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
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
from keepcount.bench import (
    BENCHMARKS,
    BenchError,
    BenchResult,
    Comparison,
    Settings,
    cassandra_scale,
    prometheus,
    workers,
)
from keepcount.bench.machine import describe
from keepcount.bench.redis import require_tools
from keepcount.bench.result import Report, settings_json
from keepcount.cli.extras import EXTRAS, needs_extra, require

__all__ = ["bench"]

_RAM_FILESYSTEMS = ("tmpfs", "ramfs")
_EXTRA_MODULES = {
    "failover": EXTRAS["etcd"],
    "cassandra": EXTRAS["cassandra"],
    "cassandra-scale": (*EXTRAS["cassandra"], *EXTRAS["etcd"]),
}
"""Benchmarks that need modules of an optional extra (the failover's cluster
takes its claims in etcd; so do cassandra-scale's restarted nodes)."""


@click.command()
@click.argument(
    "which",
    type=click.Choice([*BENCHMARKS, "workers", "prometheus", "cassandra-scale", "all"]),
    default="all",
)
@click.option("--quick", is_flag=True, help="Tiny sizes and short runs: a smoke test.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="Also write the results as JSON to this file.",
)
@click.option(
    "--duration",
    "--seconds",
    "duration",
    type=click.FloatRange(min=0.1, max=600),
    default=None,
    help="Seconds per throughput measurement (default 5, workers 10; 0.5 with --quick, workers 1).",
)
@click.option(
    "--backends",
    default=",".join(workers.BACKENDS),
    show_default=True,
    help="workers only: the metrics backends to measure, comma-separated.",
)
@click.option(
    "--worker-class",
    "worker_classes",
    type=click.Choice(workers.WORKER_CLASSES),
    multiple=True,
    help="workers only: gunicorn worker class(es) (default: sync, then gthread; sync with --quick).",
)
@click.option(
    "--workers",
    "worker_count",
    type=click.IntRange(min=1, max=16),
    default=2,
    show_default=True,
    help="workers only: gunicorn -w.",
)
@click.option(
    "--rounds",
    type=click.IntRange(min=1, max=20),
    default=None,
    help="workers only: wrk runs per backend, interleaved (default 3; 1 with --quick).",
)
@click.option(
    "--markdown",
    type=click.Path(dir_okay=False, writable=True, path_type=Path),
    help="workers only: also write the BENCHMARKS.md section to this file.",
)
def bench(
    which: str,
    quick: bool,
    out: Path | None,
    duration: float | None,
    backends: str,
    worker_classes: tuple[str, ...],
    worker_count: int,
    rounds: int | None,
    markdown: Path | None,
) -> None:
    """Run benchmarks (default: all), each measured side by side with a peer."""
    names = list(BENCHMARKS) if which == "all" else [which]
    runners: dict[str, Callable[[Settings, Report], BenchResult]] = dict(BENCHMARKS)
    runners["prometheus"] = prometheus.run
    runners["cassandra-scale"] = cassandra_scale.run
    if which == "workers":
        chosen = tuple(b.strip() for b in backends.split(",") if b.strip())
        unknown = sorted(set(chosen) - set(workers.BACKENDS))
        if unknown or not chosen:
            raise click.BadParameter(
                f"{', '.join(unknown) or 'none given'}; choose among {', '.join(workers.BACKENDS)}",
                param_hint="--backends",
            )
        options = workers.Options(
            backends=chosen,
            worker_classes=worker_classes or (("sync",) if quick else workers.WORKER_CLASSES),
            workers=worker_count,
            rounds=rounds,
        )
        runners["workers"] = functools.partial(workers.run, options=options)
    extra = "cassandra" if names == ["cassandra"] else "cluster"
    require("bench", extra, *(m for n in names for m in _EXTRA_MODULES.get(n, ())))
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
    if duration is None:
        duration = (1.0 if quick else 10.0) if which == "workers" else (0.5 if quick else 5.0)
    with tempfile.TemporaryDirectory(prefix="keepcount-bench-") as tmp:
        settings = Settings(Path(tmp), quick, duration)
        machine = describe(settings.workdir)
        _header(console, machine, settings)
        with needs_extra("bench", extra):
            results = _run_all(console, names, settings, runners)
    console.print(_summary(results))
    doc = {
        "keepcount": __version__,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": ["keepcount", *sys.argv[1:]],
        "settings": settings_json(settings),
        "machine": machine,
        "benchmarks": {r.name: r.to_json() for r in results},
    }
    if out is not None:
        out.write_text(json.dumps(doc, indent=2) + "\n")
        console.print(f"results written to {out}")
    if markdown is not None and "workers" in doc["benchmarks"]:
        markdown.write_text(workers_markdown(doc))
        console.print(f"BENCHMARKS.md section written to {markdown}")


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _run_all(
    console: Console,
    names: list[str],
    settings: Settings,
    runners: Mapping[str, Callable[[Settings, Report], BenchResult]],
) -> list[BenchResult]:
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
                result = runners[name](settings, report)
            except BenchError as exc:
                raise click.ClickException(f"{name}: {exc}") from None
            result.seconds = time.perf_counter() - started
            progress.remove_task(task)
            progress.advance(overall)
            if name == "workers":
                progress.console.print(_workers_table(result))
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


def _workers_table(result: BenchResult) -> Table:
    """``workers``: one row per worker class and backend."""
    table = Table(title="requests/s by metrics backend", title_justify="left")
    for col in ("class", "backend", "req/s", "runs", "vs mp", "p50", "p99", "non-2xx", "killed"):
        table.add_column(col, justify="left" if col in ("class", "backend", "killed") else "right")
    for r in result.notes["rows"]:
        ratio = r["vs_multiprocess"]
        table.add_row(
            r["worker_class"],
            r["label"],
            f"{r['req_s']:,.0f}",
            " ".join(f"{x:,.0f}" for x in r["runs"]),
            "" if ratio is None else f"{ratio:.2f}x",
            f"{r['p50_ms']:.2f} ms",
            f"{r['p99_ms']:.2f} ms",
            str(r["non_2xx"] + r["socket_errors"]),
            _survived(r, bold=""),
        )
    table.caption = "killed: /metrics after SIGKILL of the process group and a restart"
    table.caption_justify = "left"
    return table


def workers_markdown(doc: dict[str, Any]) -> str:
    """The BENCHMARKS.md section of a ``workers`` run, from the JSON ``--out`` writes."""
    result = doc["benchmarks"]["workers"]
    notes, machine = result["notes"], doc["machine"]
    v = notes["versions"]
    pdc = (
        f", prometheus-distributed-client {v['prometheus-distributed-client']} "
        f"(own venv, prometheus_client {v['pdc_prometheus_client']})"
        if "pdc_prometheus_client" in v
        else ""
    )
    lines = [
        f"## Multi-worker web app: `gunicorn -w {notes['workers']}` (issue 14)",
        "",
        f"`{' '.join(doc['command'])}`, {doc['date']}. {machine['nproc']} vCPUs "
        f'("{machine["cpu_model"]}"), Linux {machine["kernel"]}, Python {machine["python"]}, '
        f"SQLite {machine['sqlite']}, data on {machine['workdir_filesystem']}. "
        f"Flask {v['flask']}, gunicorn {v['gunicorn']}, prometheus_client "
        f"{v['prometheus_client']}{pdc}. wrk `-t{notes['wrk_threads']} -c{notes['connections']} "
        f"-d{notes['duration_s']:g}s` against `{notes['route']}`, {notes['rounds']} rounds per "
        "backend in a rotating order with every server up; medians. Crash check: "
        f"{notes['crash_requests']} requests to a fresh server, scrape, SIGKILL of the process "
        "group, restart, scrape.",
        "",
    ]
    for wc in dict.fromkeys(r["worker_class"] for r in notes["rows"]):
        threads = f" --threads {notes['gthread_threads']}" if wc == "gthread" else ""
        lines += [
            f"`gunicorn -w {notes['workers']} -k {wc}{threads}`:",
            "",
            "| backend | req/s (median; runs) | vs multiprocess | p50 / p99 | errors "
            "| `/metrics` after SIGKILL + restart |",
            "|---|---|---|---|---|---|",
        ]
        for r in (r for r in notes["rows"] if r["worker_class"] == wc):
            runs = " / ".join(f"{x:,.0f}" for x in r["runs"])
            ratio = "" if r["vs_multiprocess"] is None else f"{r['vs_multiprocess']:.2f}x"
            lines.append(
                f"| {r['label']} | **{r['req_s']:,.0f}** ({runs}) | {ratio} | "
                f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} ms | {r['non_2xx'] + r['socket_errors']} "
                f"| {_survived(r)} |"
            )
        lines.append("")
    lines += ["Targets:", ""]
    for c in result["comparisons"]:
        if c["target"] is not None:
            mark = "✅ met" if c["met"] else "❌ not met"
            lines.append(
                f"- {mark}: {c['measure']} {c['keepcount']:,.0f} vs {c['peer_name']} "
                f"{c['peer']:,.0f}: **{c['ratio']:.2f}x** (target {c['target']})"
            )
    before = ", ".join(
        f"{workers.LABELS[b]} {n:,}/s" for b, n in notes["one_worker_before"].items()
    )
    load = notes.get("loadavg", {})
    lines += [
        "",
        f"Before, one sync worker each (issue 14): {before}.",
        "",
        f"Load average (1, 5, 15 min) before / after the run: {load.get('before')} / "
        f"{load.get('after')} (on 2 cores; the second one includes the run's own processes).",
        "",
    ]
    return "\n".join(lines)


def _survived(row: dict[str, Any], bold: str = "**") -> str:
    crash = row["crash"]
    if crash.get("after_restart") is None:
        return "— (no metrics)"
    text = f"{bold}{crash['after_restart']:,}{bold} of {crash['acknowledged']:,} acknowledged"
    if crash.get("multiproc_files_before_wipe") is not None:
        text += f" (its files held {crash['multiproc_files_before_wipe']:,} before the wipe)"
    return text
