"""``prometheus``: keepcount.prometheus's hot paths against prometheus_client's.

``keepcount.prometheus`` is meant as a drop-in for prometheus_client whose
values are durable, so its in-memory calls should cost no more than
prometheus_client's (target: ratio <= 1.0 for ``Counter.inc()``,
``Counter.labels(...).inc()``, ``Histogram.observe()`` and ``Gauge.set()``).
The same ``timeit`` statement runs against three sets of the same metrics:

- keepcount's, in a ``keepcount.prometheus.CollectorRegistry`` bound to a
  SQLite store: once with ``flush_interval=None`` (the figures the targets
  apply to: the hot path alone) and once with the default flush interval
  (the background flusher running, as in production);
- prometheus_client's in-memory ones, in a fresh ``CollectorRegistry`` of the
  same process: the peer of the targets;
- prometheus_client's in multiprocess mode (context rows, no target): its
  values are chosen when ``prometheus_client.values`` is first imported, so
  they are timed in a child process started with ``PROMETHEUS_MULTIPROC_DIR``
  set (``python -m keepcount.bench.prometheus``), which answers one request
  per line on stdin.

All four are interleaved, repetition by repetition, and each reports the
median of its repetitions.
"""

from __future__ import annotations

import functools
import json
import os
import select
import subprocess
import sys
import tempfile
import timeit
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import prometheus_client

import keepcount.prometheus as kp
from keepcount.bench.measure import median, timeit_loops, timeit_sampler
from keepcount.bench.result import BenchError, BenchResult, Comparison, Report, Settings, Target
from keepcount.commit import DEFAULT_FLUSH_INTERVAL

__all__ = ["run"]

_PEER = f"prometheus_client {version('prometheus_client')}"
_PEER_MP = f"{_PEER} multiprocess mode (PROMETHEUS_MULTIPROC_DIR)"
_TARGET = Target("ratio", "<=", 1.0)
_WORKER_TIMEOUT = 120.0
"""Seconds to wait for one answer of the multiprocess child (a repetition is ~0.2 s)."""


@dataclass(frozen=True, slots=True)
class _Case:
    measure: str
    stmt: str
    target: Target | None


_CASES = (
    _Case("Counter.inc()", "counter.inc()", _TARGET),
    _Case("Counter.labels('GET', '200').inc()", "fam.labels('GET', '200').inc()", _TARGET),
    _Case(
        "Counter.labels(method=.., status=..).inc()",
        "fam.labels(method='GET', status='200').inc()",
        _TARGET,
    ),
    _Case("child.inc() (labels() kept)", "child.inc()", None),
    _Case("Histogram.observe(0.3)", "histogram.observe(0.3)", _TARGET),
    _Case("Gauge.set(1.5)", "gauge.set(1.5)", _TARGET),
    _Case("Gauge.inc()", "gauge.inc()", None),
    _Case("Summary.observe(0.3)", "summary.observe(0.3)", None),
)


def _metrics(module: Any, registry: Any) -> dict[str, Any]:
    """The statements' globals: the same metrics, from ``module``, in ``registry``."""
    fam = module.Counter("bench_requests", "labelled", ["method", "status"], registry=registry)
    return {
        "counter": module.Counter("bench_events", "label-less", registry=registry),
        "fam": fam,
        "child": fam.labels("GET", "200"),
        "histogram": module.Histogram(
            "bench_latency_seconds", "default buckets", registry=registry
        ),
        "gauge": module.Gauge("bench_in_flight", "label-less", registry=registry),
        "summary": module.Summary("bench_size_bytes", "label-less", registry=registry),
    }


def _warm(namespace: dict[str, Any]) -> None:
    """Run every statement once: children made, series marked, registry started."""
    for case in _CASES:
        exec(case.stmt, dict(namespace))  # noqa: S102 - our own constant statements


def run(settings: Settings, report: Report) -> BenchResult:
    """Time each case with ``timeit``: ours (two flush settings), prometheus_client's
    in memory and in multiprocess mode, interleaved."""
    repeats = 3 if settings.quick else 11
    seconds_per_repeat = 0.02 if settings.quick else 0.2
    result = BenchResult(
        "prometheus", "keepcount.prometheus vs prometheus_client: in-memory hot paths"
    )
    with tempfile.TemporaryDirectory(prefix="prometheus-", dir=settings.workdir) as tmp:
        quiet = kp.CollectorRegistry(
            store=f"sqlite:///{tmp}/quiet.db", node="bench", flush_interval=None
        )
        flushing = kp.CollectorRegistry(store=f"sqlite:///{tmp}/flushing.db", node="bench")
        try:
            namespaces = {
                "quiet": _metrics(kp, quiet),
                "flushing": _metrics(kp, flushing),
                "peer": _metrics(prometheus_client, prometheus_client.CollectorRegistry()),
            }
            for namespace in namespaces.values():
                _warm(namespace)
            quiet.commit_sync()  # the store is open and the slot bound before timing
            flushing.commit_sync()
            with _multiprocess_peer(Path(tmp) / "multiproc") as mp:
                rows = _measure(namespaces, mp, repeats, seconds_per_repeat, report)
            quiet.commit_sync()
            flushing.commit_sync()
        finally:
            quiet.close()
            flushing.close()
    main, with_flush, vs_mp = [], [], []
    for case, (figures, loops) in zip(_CASES, rows, strict=True):
        ours, default, peer, mp_ns = (
            median(figures[k]) for k in ("quiet", "flushing", "peer", "mp")
        )
        detail = {"loops_per_repeat": loops["peer"], "repeats": repeats, "stmt": case.stmt}
        main.append(
            Comparison(
                case.measure, "ns/op", ours, peer, _PEER, case.target, detail, "flush_interval=None"
            )
        )
        with_flush.append(
            Comparison(
                case.measure,
                "ns/op",
                default,
                peer,
                _PEER,
                None,
                detail,
                f"default flush_interval ({DEFAULT_FLUSH_INTERVAL:g} s)",
            )
        )
        vs_mp.append(
            Comparison(
                case.measure,
                "ns/op",
                ours,
                mp_ns,
                _PEER_MP,
                None,
                {**detail, "loops_per_repeat": loops["mp"]},
                "vs multiprocess mode",
            )
        )
    result.comparisons = [*main, *with_flush, *vs_mp]
    result.notes = {
        "timer": "timeit, gc disabled; median of interleaved repeats",
        "store": "sqlite (keepcount.prometheus.CollectorRegistry, node='bench')",
        "repeats": repeats,
        "default_flush_interval_s": DEFAULT_FLUSH_INTERVAL,
    }
    return result


def _measure(
    namespaces: dict[str, dict[str, Any]],
    mp: _Worker,
    repeats: int,
    seconds: float,
    report: Report,
) -> list[tuple[dict[str, list[float]], dict[str, int]]]:
    """Per case: every side's ns/op figures, and the loops of its repetitions.

    Each side runs once per repetition, in turn (ours, ours with the flusher,
    peer, multiprocess peer), so all see the same swings; the turn starts one
    side later each repetition, so none is always first after the one before."""
    rows = []
    total = len(_CASES) * repeats
    for n, case in enumerate(_CASES):
        timers = {k: timeit.Timer(case.stmt, globals=ns) for k, ns in namespaces.items()}
        number = timeit_loops(timers["peer"], seconds)
        loops = {"peer": number, "mp": mp.loops(case.stmt, seconds)}
        samplers: dict[str, Callable[[], float]] = {
            k: timeit_sampler(timer, number) for k, timer in timers.items()
        }
        samplers["mp"] = functools.partial(mp.time, case.stmt, loops["mp"])
        figures: dict[str, list[float]] = {k: [] for k in samplers}
        order = list(samplers)
        for i in range(repeats):
            for k in order[i % len(order) :] + order[: i % len(order)]:
                figures[k].append(samplers[k]())
            report(n * repeats + i + 1, total, f"prometheus: {case.measure} {i + 1}/{repeats}")
        rows.append((figures, loops))
    return rows


# -- the multiprocess-mode peer ---------------------------------------------------


class _Worker:
    """The child timing prometheus_client in multiprocess mode: one JSON
    request per line on its stdin, one JSON answer per line on its stdout."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._proc = proc
        hello = self._read()
        if hello.get("multiprocess") is not True:
            raise BenchError(f"the multiprocess peer is not in multiprocess mode: {hello}")

    def loops(self, stmt: str, seconds: float) -> int:
        return int(self._ask({"op": "loops", "stmt": stmt, "seconds": seconds})["loops"])

    def time(self, stmt: str, number: int) -> float:
        return float(self._ask({"op": "time", "stmt": stmt, "number": number})["ns"])

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        return self._read()

    def _read(self) -> dict[str, Any]:
        out = self._proc.stdout
        assert out is not None
        ready, _, _ = select.select([out], [], [], _WORKER_TIMEOUT)
        line = out.readline() if ready else ""
        if not line:
            stderr = self._proc.stderr.read() if self._proc.stderr and not ready else ""
            raise BenchError(f"the multiprocess peer did not answer: {stderr[-2000:]}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise BenchError(f"the multiprocess peer failed: {answer['error']}")
        return answer


@contextmanager
def _multiprocess_peer(directory: Path) -> Iterator[_Worker]:
    directory.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "keepcount.bench.prometheus"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=env,
    )  # fmt: skip
    try:
        yield _Worker(proc)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()  # EOF: the child returns
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _serve() -> int:
    """The child: prometheus_client's metrics in multiprocess mode, timed on request."""
    from prometheus_client import values

    out = sys.stdout
    multiprocess = bool(getattr(values.ValueClass, "_multiprocess", False))
    out.write(json.dumps({"multiprocess": multiprocess}) + "\n")
    out.flush()
    namespace = _metrics(prometheus_client, prometheus_client.CollectorRegistry())
    _warm(namespace)
    timers: dict[str, timeit.Timer] = {}
    for line in sys.stdin:
        try:
            request = json.loads(line)
            stmt = request["stmt"]
            timer = timers.setdefault(stmt, timeit.Timer(stmt, globals=namespace))
            if request["op"] == "loops":
                answer: dict[str, Any] = {"loops": timeit_loops(timer, float(request["seconds"]))}
            else:
                number = int(request["number"])
                answer = {"ns": timer.timeit(number) / number * 1e9}
        except Exception as exc:  # reported to the parent, which raises
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_serve())
