"""``workers``: the same Flask app under multi-worker gunicorn, five ways of counting (issue 14).

One Flask app (``keepcount.bench.workers_app``), its metrics backend chosen
by an environment variable, served by ``gunicorn -w 2``
(``keepcount.bench.workers_server``) — sync workers, then
gthread workers (``--threads 8``, where concurrent requests of one worker
share a commit) — and driven by wrk (``-t2 -c16``, POST to ``/hello``).
Every backend counts the same three families per request (requests,
errors, a latency histogram):

- ``none``: no metrics, the ceiling;
- ``multiprocess``: prometheus_client's multiprocess mode, the peer every
  ratio is taken against (measured in the same run);
- ``pdc``: prometheus-distributed-client on SQLite, in a virtual
  environment of its own (it pins prometheus_client 0.23), created on first
  use at ``~/.cache/keepcount/pdc-venv`` with the same Flask, Werkzeug and
  gunicorn versions as ours;
- ``keepcount-async``: ``KeepcountWSGIMiddleware(durable=False)``;
- ``keepcount-durable``: ``KeepcountWSGIMiddleware(durable=True)``: a
  response starts only once its count is on disk.

All servers of a worker class are up at once, each on its own port, and wrk
runs against them in turn, ``rounds`` times in a rotating order: every
backend sees the same noise.  Then the crash check, per backend, on a fresh
server: send ``crash_requests`` requests and count the 200s, scrape
``/metrics``, SIGKILL the whole process group (master and workers), start
it again (prometheus_client's multiprocess directory wiped first, as its
documentation requires) and scrape again: what does the request counter
still show?
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from keepcount.bench.measure import median
from keepcount.bench.result import BenchError, BenchResult, Comparison, Report, Settings, Target
from keepcount.bench.workers_server import BODY, METRICS_PATH, ROUTE, THREADS, Server
from keepcount.bench.wrk import WrkRun, require_wrk, run_wrk

__all__ = [
    "BACKENDS", "CONNECTIONS", "LABELS", "PDC_VENV", "PEER", "TARGETS", "WORKER_CLASSES",
    "Options", "pdc_gunicorn", "run",
]  # fmt: skip

BACKENDS = ("none", "multiprocess", "pdc", "keepcount-async", "keepcount-durable")
"""As ``workers_app.BACKENDS`` (not imported from there: importing the app builds it)."""
LABELS = {
    "none": "no metrics",
    "multiprocess": "prometheus_client multiprocess",
    "pdc": "prometheus-distributed-client (SQLite)",
    "keepcount-async": "keepcount bounded-async",
    "keepcount-durable": "keepcount durable",
}
PEER = "multiprocess"
WORKER_CLASSES = ("sync", "gthread")
CONNECTIONS = 16
WRK_THREADS = 2
PDC_VERSION = "2.1.5"
PDC_VENV = Path.home() / ".cache" / "keepcount" / "pdc-venv"


@dataclass(frozen=True, slots=True)
class _Target(Target):
    def __str__(self) -> str:  # 0.95x, not Target's 0.9x
        return f"ratio {self.op} {self.bound:g}x" if self.of == "ratio" else Target.__str__(self)


TARGETS: tuple[tuple[str, str, Target], ...] = (
    ("keepcount-async", "multiprocess", _Target("ratio", ">=", 0.95)),
    ("keepcount-durable", "multiprocess", _Target("ratio", ">=", 0.6)),
    ("keepcount-durable", "pdc", _Target("ratio", ">=", 20)),
)
"""(ours, peer, target on ours / peer), for every worker class."""
ONE_WORKER_BEFORE = {
    "none": 3463, "multiprocess": 2912, "pdc": 64, "keepcount-async": 3138,
    "keepcount-durable": 1337,
}  # fmt: skip
"""Requests/s with one sync worker each, measured before (issue 14)."""


@dataclass(frozen=True, slots=True)
class Options:
    """What ``keepcount bench workers`` measures beyond ``Settings``."""

    backends: tuple[str, ...] = BACKENDS
    worker_classes: tuple[str, ...] = WORKER_CLASSES
    workers: int = 2
    rounds: int | None = None
    """Interleaved wrk runs per backend (default 3; 1 with ``--quick``)."""
    crash_requests: int | None = None
    """Requests before the SIGKILL (default 500; 100 with ``--quick``)."""


def _send(server: Server, requests: int, clients: int = 4) -> tuple[int, int]:
    """``requests`` POSTs from ``clients`` threads, one at a time each: (200s, others)."""

    def client(n: int) -> tuple[int, int]:
        ok = bad = 0
        for _ in range(n):
            try:
                status, _body = server.request("POST", ROUTE)
            except OSError:
                bad += 1
                continue
            ok, bad = (ok + 1, bad) if status == 200 else (ok, bad + 1)
        return ok, bad

    shares = [requests // clients + (i < requests % clients) for i in range(clients)]
    with ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(client, shares))
    return sum(d[0] for d in done), sum(d[1] for d in done)


def _requests_counted(text: str) -> int:
    """The ``http_requests_total`` samples of the benchmark's route, summed."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "http_requests_total" and s.labels.get("route") == ROUTE:
                total += s.value
    return round(total)


def _scrape(server: Server) -> int | None:
    """The route's request count ``/metrics`` shows (None: the app has no metrics).

    Every backend's ``/metrics`` shows the whole server whichever worker
    answers: prometheus_client's ``MultiProcessCollector`` reads every
    worker's files, pdc reads its one SQLite file, keepcount's
    ``make_wsgi_app`` sums the host's slots.
    """
    if server.backend == "none":
        return None
    status, body = server.request("GET", METRICS_PATH)
    if status != 200:
        raise BenchError(f"{server.what}: /metrics answered {status}: {body[:300]!r}")
    return _requests_counted(body.decode())


def _multiproc_files(directory: Path) -> int:
    """What the dead workers' files still hold (before the wipe the docs require)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return _requests_counted(generate_latest(registry).decode())


@dataclass(slots=True)
class _Measured:
    runs: list[WrkRun] = field(default_factory=list)
    crash: dict[str, Any] = field(default_factory=dict)


def run(settings: Settings, report: Report, options: Options | None = None) -> BenchResult:
    opts = options or Options()
    require_wrk()
    unknown = set(opts.backends) - set(BACKENDS)
    if unknown or not opts.backends:
        raise BenchError(f"backends must be among {', '.join(BACKENDS)}: {sorted(unknown)}")
    rounds = opts.rounds or (1 if settings.quick else 3)
    crash_n = opts.crash_requests or (100 if settings.quick else 500)
    ours = Path(sys.executable).with_name("gunicorn")
    if not ours.exists():
        raise BenchError(f"{ours} not found: pip install gunicorn flask (or scripts/setup.sh)")
    gunicorns = {b: ours for b in opts.backends}
    if "pdc" in opts.backends:
        report(0, 1, "workers: prometheus-distributed-client's venv")
        gunicorns["pdc"] = pdc_gunicorn()
    load_before = _loadavg()
    per_class = len(opts.backends) * (rounds + 2)
    steps = per_class * len(opts.worker_classes)
    measured: dict[tuple[str, str], _Measured] = {}
    with tempfile.TemporaryDirectory(prefix="workers-", dir=settings.workdir) as tmp:
        work = Path(tmp)
        for c, wc in enumerate(opts.worker_classes):
            step = c * per_class

            def progress(text: str, wc: str = wc) -> None:
                nonlocal step
                report(step, steps, f"workers ({wc}): {text}")
                step += 1

            got = _measure_class(work / wc, wc, opts, gunicorns, settings, rounds, progress)
            for b in opts.backends:
                progress(f"crash check, {b}")
                got[b].crash = _crash_check(
                    Server(b, wc, opts.workers, work / wc / f"crash-{b}", gunicorns[b]), crash_n
                )
                measured[wc, b] = got[b]
    result = _result(opts, settings, rounds, crash_n, measured)
    result.notes["loadavg"] = {"before": load_before, "after": _loadavg()}
    return result


def _loadavg() -> str:
    """The machine's load (1, 5, 15 min): others' work on these 2 cores shows up here."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def _measure_class(
    work: Path,
    wc: str,
    opts: Options,
    gunicorns: dict[str, Path],
    settings: Settings,
    rounds: int,
    progress: Callable[[str], None],
) -> dict[str, _Measured]:
    servers = {b: Server(b, wc, opts.workers, work / b, gunicorns[b]) for b in opts.backends}
    got = {b: _Measured() for b in opts.backends}
    try:
        progress("starting gunicorn")
        for s in servers.values():
            s.start()
        for s in servers.values():
            s.wait_ready()

        def wrk(server: Server, duration: float) -> WrkRun:
            return run_wrk(
                server.url, ROUTE, [BODY], connections=CONNECTIONS, threads=WRK_THREADS,
                duration=duration, workdir=server.work,
            )  # fmt: skip

        for b, s in servers.items():
            progress(f"warm-up, {b}")
            wrk(s, 1 if settings.quick else 2)
        order = list(opts.backends)
        for r in range(rounds):
            for b in order[r % len(order) :] + order[: r % len(order)]:
                progress(f"round {r + 1}/{rounds}, {b}")
                got[b].runs.append(wrk(servers[b], settings.duration))
                if not servers[b].running():
                    raise BenchError(f"{servers[b].what} died{servers[b].log_tail()}")
    finally:
        for s in servers.values():
            s.stop()
    return got


def _crash_check(server: Server, requests: int) -> dict[str, Any]:
    try:
        server.start()
        server.wait_ready()
        acked, failed = _send(server, requests)
        answered = time.monotonic()
        before = _scrape(server)
        killed = time.monotonic()
        server.kill_group()
        left = None
        if server.backend == "multiprocess":
            left = _multiproc_files(server.mp_dir)
            shutil.rmtree(server.mp_dir)  # "wiped between Gunicorn runs", as the docs require
            server.mp_dir.mkdir()
        started = time.monotonic()
        server.start()
        server.wait_ready()
        restart_s = time.monotonic() - started
        after = _scrape(server)
    finally:
        server.stop()
    return {
        "sent": requests,
        "acknowledged": acked,
        "failed": failed,
        "before_kill": before,
        "after_restart": after,
        "multiproc_files_before_wipe": left,
        "kill_after_last_answer_s": killed - answered,
        "restart_s": restart_s,
    }


def pdc_gunicorn() -> Path:
    """prometheus-distributed-client's own venv (created once), with our Flask and gunicorn."""
    want = [
        f"prometheus-distributed-client=={PDC_VERSION}",
        *(f"{p}=={version(p)}" for p in ("flask", "werkzeug", "gunicorn")),
    ]
    gunicorn = PDC_VENV / "bin" / "gunicorn"
    stamp = PDC_VENV / ".keepcount-bench"
    if gunicorn.exists() and stamp.exists() and stamp.read_text() == " ".join(want):
        return gunicorn
    python = PDC_VENV / "bin" / "python"
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(PDC_VENV)], check=True, timeout=300)
        pip = [str(python), "-m", "pip", "install", "-q", *want]
        subprocess.run(pip, check=True, timeout=900, capture_output=True, text=True)
    except subprocess.CalledProcessError as exc:
        raise BenchError(f"installing {' '.join(want)} into {PDC_VENV}: {exc.stderr}") from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BenchError(f"creating {PDC_VENV}: {exc}") from None
    stamp.write_text(" ".join(want))
    return gunicorn


def _pdc_prometheus_client() -> str:
    out = subprocess.run(
        [str(PDC_VENV / "bin" / "python"), "-c", "import importlib.metadata as m;"
         "print(m.version('prometheus_client'))"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    return out.stdout.strip() or "unknown"


def _result(
    opts: Options,
    settings: Settings,
    rounds: int,
    crash_n: int,
    measured: dict[tuple[str, str], _Measured],
) -> BenchResult:
    result = BenchResult(
        "workers",
        f"Flask under gunicorn -w {opts.workers}: req/s by metrics backend (wrk -c{CONNECTIONS})",
    )
    rows: list[dict[str, Any]] = []
    for wc in opts.worker_classes:
        rate = {b: median([r.per_s for r in measured[wc, b].runs]) for b in opts.backends}
        for b in opts.backends:
            m = measured[wc, b]
            rows.append(
                {
                    "worker_class": wc,
                    "backend": b,
                    "label": LABELS[b],
                    "req_s": rate[b],
                    "runs": [r.per_s for r in m.runs],
                    "p50_ms": median([r.p50_ms for r in m.runs]),
                    "p99_ms": median([r.p99_ms for r in m.runs]),
                    "vs_multiprocess": rate[b] / rate[PEER] if PEER in rate else None,
                    "non_2xx": sum(r.non_2xx for r in m.runs),
                    "socket_errors": sum(r.socket_errors for r in m.runs),
                    "crash": m.crash,
                }
            )
        result.comparisons += _comparisons(wc, rows[-len(opts.backends) :], rate)
    result.notes = {
        "workers": opts.workers,
        "gthread_threads": THREADS,
        "connections": CONNECTIONS,
        "wrk_threads": WRK_THREADS,
        "duration_s": settings.duration,
        "rounds": rounds,
        "crash_requests": crash_n,
        "route": f"POST {ROUTE}",
        "versions": {p: version(p) for p in ("flask", "werkzeug", "gunicorn", "prometheus_client")},
        "one_worker_before": ONE_WORKER_BEFORE,
        "rows": rows,
    }
    if "pdc" in opts.backends:
        result.notes["versions"]["prometheus-distributed-client"] = PDC_VERSION
        result.notes["versions"]["pdc_prometheus_client"] = _pdc_prometheus_client()
    return result


def _comparisons(wc: str, rows: list[dict[str, Any]], rate: dict[str, float]) -> list[Comparison]:
    out: list[Comparison] = []
    by = {r["backend"]: r for r in rows}
    targets = {(o, p): t for o, p, t in TARGETS}
    for b, row in by.items():
        if b == PEER or PEER not in by:
            continue
        out.append(
            Comparison(
                f"{wc}: {LABELS[b]} req/s",
                "ops/s",
                rate[b],
                rate[PEER],
                f"{LABELS[PEER]}, same run",
                targets.get((b, PEER)),
                {"runs": row["runs"], "peer_runs": by[PEER]["runs"]},
                note=f"p50 {row['p50_ms']:.2f} / p99 {row['p99_ms']:.2f} ms",
            )
        )
    if "keepcount-durable" in by and "pdc" in by:
        out.append(Comparison(
            f"{wc}: {LABELS['keepcount-durable']} req/s", "ops/s", rate["keepcount-durable"],
            rate["pdc"], f"{LABELS['pdc']}, same run", targets[("keepcount-durable", "pdc")],
        ))  # fmt: skip
    for b, row in by.items():
        crash = row["crash"]
        if crash.get("after_restart") is not None:
            out.append(
                Comparison(
                    f"{wc}: {LABELS[b]}: count after SIGKILL + restart",
                    "requests",
                    crash["after_restart"],
                    crash["acknowledged"],
                    "requests acknowledged before the SIGKILL",
                    detail=crash,
                    note=f"before the kill /metrics showed {crash['before_kill']}",
                )
            )
    return out
