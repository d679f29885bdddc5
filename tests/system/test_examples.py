"""The examples users copy, run as they are told to: real servers, many workers.

Each case starts an example under its server (gunicorn, uvicorn) with
several workers on one SQLite store and one ``KEEPCOUNT_NODE``, sends
requests, SIGKILLs one worker, sends more, and holds the host's ``/metrics``
(scraped several times: each scrape may land on another worker) against the
client's tally: in durable mode a response is an acknowledgement, so once all
responses arrived the host's total equals their count.  Then it SIGKILLs the
whole server, starts it again, and the totals must be the same, then grow by
exactly what is sent next.  The host never has more slots than workers alive
at once, however often they recycle (``--max-requests``) or die.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from keepcount.nodeproc import free_port
from keepcount.slots import host_of
from keepcount.stores import open_store

pytestmark = [pytest.mark.slow, pytest.mark.crash, pytest.mark.g1]

ROOT = Path(__file__).parents[2]
CLIENTS = 8
FIRST, SECOND, AFTER_RESTART = 160, 160, 40


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    """After ``python -m``; ``{port}`` is replaced by a free port."""
    workers: int
    path: str
    route: str
    needs: tuple[str, ...]
    """Importable modules the case needs."""
    recycles: bool = False
    metrics: str = "/metrics"
    """Where the host's ``/metrics`` answers 200."""
    host_slots: bool = True
    """``/metrics`` shows ``keepcount_host_slots`` (keepcount's own); else
    (``keepcount.prometheus``) the host's slots are counted in the store."""
    duration_count: bool = False
    """The route's ``http_request_duration_seconds_count`` must equal its
    ``http_requests_total`` too (counted before the same commit)."""


def _gunicorn(*args: str) -> tuple[str, ...]:
    return ("gunicorn", "-b", "127.0.0.1:{port}", *_no_control_socket(), *args)


def _no_control_socket() -> tuple[str, ...]:
    """gunicorn >= 24 listens on ~/.gunicorn/gunicorn.ctl, one path for every
    gunicorn of the user: keep tests off it."""
    try:
        from gunicorn.config import KNOWN_SETTINGS
    except ImportError:
        return ()
    flags = {flag for s in KNOWN_SETTINGS for flag in (s.cli or ())}
    return ("--no-control-socket",) if "--no-control-socket" in flags else ()


CASES = {
    "flask-gunicorn-max-requests": Case(
        _gunicorn("-w", "4", "--max-requests", "50", "examples.flask_app:app"),
        4, "/items/1", "/items/<int:item_id>", ("gunicorn", "flask"), recycles=True,
    ),
    "fastapi-uvicorn-workers": Case(
        ("uvicorn", "--workers", "4", "--host", "127.0.0.1", "--port", "{port}",
         "examples.fastapi_app:app"),
        4, "/items/1", "/items/{item_id}", ("uvicorn", "fastapi"),
    ),
    "fastapi-gunicorn-uvicorn-worker": Case(
        _gunicorn("-w", "2", "-k", "uvicorn_worker.UvicornWorker", "examples.fastapi_app:app"),
        2, "/items/2", "/items/{item_id}", ("gunicorn", "uvicorn_worker", "fastapi"),
    ),
    "django-gunicorn": Case(
        _gunicorn("-w", "2", "--chdir", "examples/django_app", "mysite.wsgi"),
        2, "/items/1", "/items/<int:item_id>", ("gunicorn", "django"),
    ),
    # The prometheus_client-style examples (keepcount.prometheus): /metrics
    # has no keepcount_host_slots, and Starlette's mount answers on /metrics/.
    "prometheus-flask-gunicorn-max-requests": Case(
        _gunicorn("-w", "4", "--max-requests", "50", "examples.prometheus_flask_app:app"),
        4, "/items/1", "/items/<int:item_id>", ("gunicorn", "flask"), recycles=True,
        host_slots=False, duration_count=True,
    ),
    "prometheus-fastapi-uvicorn-workers": Case(
        ("uvicorn", "--workers", "4", "--host", "127.0.0.1", "--port", "{port}",
         "examples.prometheus_fastapi_app:app"),
        4, "/items/1", "/items/{item_id}", ("uvicorn", "fastapi"),
        metrics="/metrics/", host_slots=False, duration_count=True,
    ),
    "prometheus-fastapi-gunicorn-uvicorn-worker": Case(
        _gunicorn("-w", "2", "-k", "uvicorn_worker.UvicornWorker",
                  "examples.prometheus_fastapi_app:app"),
        2, "/items/2", "/items/{item_id}", ("gunicorn", "uvicorn_worker", "fastapi"),
        metrics="/metrics/", host_slots=False, duration_count=True,
    ),
}  # fmt: skip

PACKAGES = {"uvicorn_worker": "uvicorn-worker"}


def _need(modules: tuple[str, ...]) -> None:
    missing = [PACKAGES.get(m, m) for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(
            f"not installed: {', '.join(missing)}; install with "
            f"`{sys.executable} -m pip install {' '.join(missing)}` "
            "(or `pip install -e '.[test]'`)"
        )


class Server:
    """One server process group, its output in a log file."""

    def __init__(self, case: Case, env: dict[str, str], log: Path) -> None:
        self.case = case
        self.store = env["KEEPCOUNT_STORE"]
        self.host = env["KEEPCOUNT_NODE"]
        self.port = free_port()
        args = [a.replace("{port}", str(self.port)) for a in case.args]
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.base = f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout: float = 30.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.base}{self.case.metrics}", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)  # poll interval, not a synchronisation
        pytest.fail(f"server not ready within {timeout} s:\n{self.output()}")

    def workers(self) -> list[int]:
        """The server's worker processes (children, not uvicorn's resource tracker)."""
        found = []
        for pid, ppid, _pgrp, state in _processes():
            if ppid == self.proc.pid and state != "Z":
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue  # gone meanwhile
                if b"resource_tracker" not in cmdline:
                    found.append(pid)
        return found

    def kill_group(self) -> None:
        """SIGKILL every process of the server and wait until none runs."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        _wait_gone(lambda: [p for p, _, g, s in _processes() if g == self.proc.pid and s != "Z"])


def _processes() -> Iterator[tuple[int, int, int, str]]:
    """(pid, ppid, pgrp, state) of every process."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        yield int(entry.name), int(fields[1]), int(fields[2]), fields[0]


def _wait_gone(alive: Callable[[], list[int]], timeout: float = 10.0) -> None:
    """Poll until ``alive()`` lists no process (a killed process holds its
    slot lock until it has exited)."""
    deadline = time.monotonic() + timeout
    while (left := alive()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not left, f"processes still alive after SIGKILL: {left}"


def _send(base: str, path: str, n: int) -> int:
    """``n`` GETs from ``CLIENTS`` threads; how many were answered 200."""
    import httpx

    with httpx.Client(base_url=base, timeout=10) as client:

        def one(_: int) -> bool:
            try:
                return client.get(path).status_code == 200
            except httpx.HTTPError:
                return False

        with ThreadPoolExecutor(CLIENTS) as pool:
            return sum(pool.map(one, range(n)))


def _scrape(server: Server) -> tuple[int, int]:
    """(host's http_requests_total for the case's route summed over labels,
    the host's slots); checks the route's duration count if the case says so."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    case = server.case
    resp = httpx.get(server.base + case.metrics, timeout=10)  # a new connection: any worker
    assert resp.status_code == 200, resp.text
    total, slots, durations = 0, -1, 0
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            # keepcount's /metrics has integer values, keepcount.prometheus's floats ("12.0").
            route = sample.labels.get("route")
            if sample.name == "http_requests_total" and route == case.route:
                assert float(sample.value).is_integer(), sample
                total += int(sample.value)
            elif sample.name == "http_request_duration_seconds_count" and route == case.route:
                durations += int(sample.value)
            elif sample.name == "keepcount_host_slots":
                slots = int(sample.value)
    if case.duration_count:
        assert durations == total, f"{durations} observed, {total} counted:\n{resp.text}"
    if case.host_slots:
        assert slots >= 0, resp.text
    else:
        slots = _store_slots(server.store, server.host)
    return total, slots


def _store_slots(url: str, host: str) -> int:
    """How many slots ``host`` has in the store (what keepcount_host_slots says)."""
    store = open_store(url)
    try:
        return sum(1 for record in store.nodes() if host_of(record.node) == host)
    finally:
        store.close()


def _check(server: Server, expected: int, scrapes: int = 6) -> None:
    case = server.case
    for _ in range(scrapes):
        total, slots = _scrape(server)
        assert total == expected, f"host total {total}, acknowledged {expected}"
        assert 1 <= slots <= case.workers, f"{slots} slots for {case.workers} workers"


@pytest.mark.parametrize("name", list(CASES))
def test_example_under_its_server(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    _need(("httpx", *case.needs))
    env = {
        **os.environ,
        "KEEPCOUNT_STORE": f"sqlite:///{tmp_path}/counters.db",
        "KEEPCOUNT_NODE": "web-1",
    }
    log = tmp_path / "server.log"
    server = Server(case, env, log)
    try:
        server.wait_ready()
        acked = _send(server.base, case.path, FIRST)
        assert acked == FIRST, server.output()
        _check(server, acked)

        # One worker SIGKILLed: its acknowledged counts stay in the host's totals.
        workers = server.workers()
        assert workers, server.output()
        os.kill(workers[0], signal.SIGKILL)
        _wait_gone(lambda: [p for p, _, _, s in _processes() if p == workers[0] and s != "Z"])
        acked += _send(server.base, case.path, SECOND)
        assert acked == FIRST + SECOND, server.output()
        _check(server, acked)
        if case.recycles:
            assert "Autorestarting worker" in log.read_text(), "no worker recycled"

        # The whole server SIGKILLed and started again: every worker takes a
        # slot again and restores it; nothing goes back, and counting goes on.
        server.kill_group()
        server = Server(case, env, log)
        server.wait_ready()
        _check(server, acked)
        acked += _send(server.base, case.path, AFTER_RESTART)
        assert acked == FIRST + SECOND + AFTER_RESTART, server.output()
        _check(server, acked)
    finally:
        if server.proc.poll() is None:
            server.kill_group()
