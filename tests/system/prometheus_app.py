"""The app the keepcount.prometheus system tests run (test_prometheus_workers.py).

Every metric is module-level and in the default ``keepcount.prometheus.REGISTRY``,
bound by ``KEEPCOUNT_STORE`` and ``KEEPCOUNT_NODE`` alone, as an app migrated
from prometheus_client would be.

- ``app``: a plain WSGI app for ``gunicorn prometheus_app:app`` (no
  ``--preload``).  Each worker, as it imports this module, takes a slot
  (``REGISTRY.commit_sync()``) and sets every ``pw_gauge_<mode>`` to
  ``10 + its slot index``, then ``pw_worker_pid`` (``liveall``) to its pid,
  and commits.  ``/metrics`` is ``make_wsgi_app()``; ``/whoami`` and
  ``/touch`` (which sets every gauge again, so it is the value set last)
  answer ``{"slot", "pid", "value"}`` once ``pw_requests_total`` counted them
  durably.
- ``python prometheus_app.py count THREADS BASE SECONDS``: threads change a
  counter with labels, a histogram, a summary, a ``max`` gauge, an info and
  an enum, one operation at a time, each followed by ``commit_sync()``.  A
  line ``{"try": ...}`` goes out before each operation changes anything, a
  line ``{"ack": ...}`` after its commit returned: what the process had done
  before that commit, all durable (see ``count``).
- ``python prometheus_app.py collect THREAD...``: binds (restoring the slot),
  prints one JSON line: the slot, this process's own values after the
  restore, and ``generate_latest(REGISTRY)`` (the host's).
- ``python prometheus_app.py hold``: binds and answers commands read from
  stdin, one JSON line each: ``set`` (the gauges, as a worker does),
  ``collect``, ``local``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from keepcount.prometheus import (
    REGISTRY,
    Counter,
    Enum,
    Gauge,
    Histogram,
    Info,
    Summary,
    generate_latest,
    make_wsgi_app,
)

# -- the restore test's metrics -----------------------------------------------------

OPS = Counter("pw_ops", "Operations, by thread", ["thread"])
LATENCY = Histogram("pw_latency_seconds", "0.5 for odd operations, 1.5 for even", buckets=(1, 2))
SIZE = Summary("pw_size_bytes", "Operation n observes n % 3")
HIGH = Gauge("pw_high_water", "The last operation's number", multiprocess_mode="max")
BUILD = Info("pw_build", "The last operation's number")
PHASES = ("a", "b", "c", "d", "e", "f", "g")
PHASE = Enum("pw_phase", "PHASES[number % 7] of the last operation", states=list(PHASES))


def latency_of(n: int) -> float:
    return 0.5 if n % 2 else 1.5


def size_of(n: int) -> float:
    return float(n % 3)


# -- the gauge-modes test's metrics --------------------------------------------------

MODES = (
    "all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum",
    "mostrecent", "livemostrecent",
)  # fmt: skip
GAUGES = {
    mode: Gauge(f"pw_gauge_{mode}", f"10 + slot index, mode {mode}", multiprocess_mode=mode)
    for mode in MODES
}
WORKER_PID = Gauge("pw_worker_pid", "The pid holding each live slot", multiprocess_mode="liveall")
REQUESTS = Counter("pw_requests", "Requests answered (not /metrics)", ["path"])


def slot_index(node: str) -> int:
    """``web-1`` -> 0, ``web-1@2`` -> 2."""
    _, sep, index = node.rpartition("@")
    return int(index) if sep else 0


def bind() -> str:
    """Take a slot (restoring it) now; its id."""
    REGISTRY.commit_sync()
    keepcount = REGISTRY.keepcount
    assert keepcount is not None, "KEEPCOUNT_STORE / KEEPCOUNT_NODE not set"
    return keepcount.node


def publish() -> dict[str, Any]:
    """Set every gauge from this process's slot (the pid last), durably."""
    node = bind()
    value = 10 + slot_index(node)
    for gauge in GAUGES.values():
        gauge.set(value)
    WORKER_PID.set(os.getpid())
    REGISTRY.commit_sync()
    return {"slot": node, "pid": os.getpid(), "value": value}


# -- WSGI -------------------------------------------------------------------------------

_metrics = make_wsgi_app()
_me: dict[str, Any] = {}


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    if path == "/metrics":
        return _metrics(environ, start_response)  # type: ignore[no-any-return]
    if path not in ("/whoami", "/touch"):
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]
    me = publish() if path == "/touch" else _me
    REQUESTS.labels(path).inc()
    REGISTRY.commit_sync()  # answered only once counted durably
    body = json.dumps(me).encode()
    start_response(
        "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
    )
    return [body]


# -- the child processes -----------------------------------------------------------------


def _line(obj: object) -> None:
    """One JSON line on stdout, unbuffered: a short one (``count``'s, under
    PIPE_BUF) in one write(2), so whole even if the process is killed."""
    data = memoryview((json.dumps(obj, separators=(",", ":")) + "\n").encode())
    while data:
        data = data[os.write(1, data) :]


def count(threads: int, base: int, seconds: float) -> None:
    """Operations until killed (or ``seconds``), numbered ``1, 2, ...`` in
    this process.  Operation n, made under one lock so the operations are
    ordered: ``OPS{thread}`` +1, ``LATENCY`` observes ``latency_of(n)``,
    ``SIZE`` observes ``size_of(n)``, and the gauge, info and enum are set
    from ``base + n``.  ``try`` is written before the first change: every
    value the store can hold is covered by the last ``try`` line.  ``ack``
    is the state right after the thread's operation, written once the
    ``commit_sync()`` that followed it returned: all of it durable."""
    lock = threading.Lock()
    names = [f"t{i}" for i in range(threads)]
    done = {"n": 0, "by": dict.fromkeys(names, 0)}
    deadline = time.monotonic() + seconds

    def run(name: str) -> None:
        while time.monotonic() < deadline:
            with lock:
                n = done["n"] + 1
                tried = {"n": n, "by": {**done["by"], name: done["by"][name] + 1}, "seq": base + n}
                _line({"try": tried})
                OPS.labels(name).inc()
                LATENCY.observe(latency_of(n))
                SIZE.observe(size_of(n))
                HIGH.set(base + n)
                BUILD.info({"seq": str(base + n)})
                PHASE.state(PHASES[(base + n) % len(PHASES)])
                done["n"], done["by"] = tried["n"], tried["by"]
            REGISTRY.commit_sync()
            with lock:
                _line({"ack": {**tried, "node": REGISTRY.keepcount.node}})  # type: ignore[union-attr]

    workers = [threading.Thread(target=run, args=(name,)) for name in names]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def _local(threads: list[str]) -> dict[str, Any]:
    """This process's own values (not the host's)."""
    values: dict[str, Any] = {}
    for metric in (OPS, LATENCY, SIZE, HIGH, BUILD, PHASE, *GAUGES.values(), WORKER_PID):
        if metric is OPS:
            for t in threads:
                OPS.labels(t)  # the restored series of these label sets
        # prometheus_client's own collect(): this process's samples only.
        for family in metric.collect():
            for s in family.samples:
                key = s.name + json.dumps(s.labels, sort_keys=True) if s.labels else s.name
                values[key] = s.value
    return values


def collect(threads: list[str]) -> None:
    node = bind()
    text = generate_latest(REGISTRY).decode()
    _line({"slot": node, "local": _local(threads), "text": text})


def hold() -> None:
    _line({"slot": bind(), "pid": os.getpid()})
    for line in sys.stdin:
        command = line.strip()
        if command == "set":
            _line(publish())
        elif command == "collect":
            _line({"slot": bind(), "text": generate_latest(REGISTRY).decode()})
        elif command == "local":
            _line({"slot": bind(), "local": _local([])})
        else:
            _line({"error": command})


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "count":
        count(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    elif what == "collect":
        collect(sys.argv[2:])
    elif what == "hold":
        hold()
    else:
        raise SystemExit(f"unknown command {what!r}")
else:  # imported by a gunicorn worker: take a slot and set the gauges before serving
    _me.update(publish())
