"""Hosts of many workers under real servers: gunicorn (sync, uvicorn workers)
and ``uvicorn --workers``, with workers SIGKILLed, recycled by
``--max-requests``, and the whole server SIGKILLed and started again.

Client threads tally the 2xx they got (acknowledged: durable before it was
sent) and the requests whose outcome they never saw; a scraper polls the
host's ``/metrics`` all along.  Each run checks, for the counted route:

- acknowledged <= host total <= acknowledged + unknown, after the load;
- no scrape ever saw a total lower than an earlier scrape;
- the host has no more slots than workers alive at once.
"""

from __future__ import annotations

import http.client
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from keepcount.nodeproc import free_port, http_get
from keepcount.slots import host_of
from keepcount.stores import open_store
from keepcount.totals import cluster_totals

pytestmark = [pytest.mark.crash, pytest.mark.slow, pytest.mark.g1]

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent
ROUTE = "/hit"


def gunicorn(port: int, workers: int, *extra: str, asgi: bool = False) -> list[str]:
    app = "worker_app:asgi_app" if asgi else "worker_app:app"
    kind = ["-k", "uvicorn_worker.UvicornWorker"] if asgi else []
    return [str(BIN / "gunicorn"), "-w", str(workers), "-b", f"127.0.0.1:{port}",
            "--chdir", str(HERE), "--graceful-timeout", "5", *kind, *extra, app]  # fmt: skip


def uvicorn(port: int, workers: int) -> list[str]:
    return [str(BIN / "uvicorn"), "--workers", str(workers), "--host", "127.0.0.1",
            "--port", str(port), "--app-dir", str(HERE), "--no-access-log",
            "worker_app:asgi_app"]  # fmt: skip


@dataclass
class Server:
    """One server process group (master and workers) on a port."""

    argv: list[str]
    port: int
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, f"server exited:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not serving:\n{self.log.read_text()[-3000:]}"
            try:
                status, _ = get(self.port, "/metrics")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)  # poll interval while the server boots

    def wait_slots(self, n: int) -> None:
        """Until the host's /metrics counts ``n`` slots: every worker has
        booted and claimed one (the first 200 only proves one worker is up)."""
        deadline = time.monotonic() + 60
        while (slots := host_total(self.port)[1]) < n:
            assert time.monotonic() < deadline, (
                f"{slots} of {n} slots:\n{self.log.read_text()[-3000:]}"
            )
            time.sleep(0.05)  # poll interval while the workers boot

    def workers(self) -> list[int]:
        """Worker pids: the master's children that serve (not helpers)."""
        assert self.proc is not None
        out = []
        for child in _children(self.proc.pid):
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"resource_tracker" not in cmdline:
                out.append(child)
        return out

    def kill_all(self) -> None:
        """SIGKILL the whole process group and wait until it is gone."""
        assert self.proc is not None
        pids = [self.proc.pid, *_children(self.proc.pid)]
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        for pid in pids:
            _wait_gone(pid)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill_all()


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        stat = Path(f"/proc/{pid}/stat").read_text() if Path(f"/proc/{pid}").exists() else ""
        if ") Z " in stat:  # a zombie: dead, its locks dropped
            return
        assert time.monotonic() < deadline, f"pid {pid} still alive"
        time.sleep(0.01)


def get(port: int, path: str) -> tuple[int, bytes]:
    return http_get("127.0.0.1", port, path, timeout=5)


_SAMPLE = re.compile(r'^http_requests_total\{[^}]*route="/hit"[^}]*\} (\S+)$', re.M)
_SLOTS = re.compile(r"^keepcount_host_slots (\S+)$", re.M)


def host_total(port: int) -> tuple[int, int]:
    """(requests of the counted route, slots) as the host's /metrics shows them."""
    status, body = get(port, "/metrics")
    assert status == 200, body
    text = body.decode()
    slots = _SLOTS.search(text)
    assert slots is not None, text
    return sum(int(float(v)) for v in _SAMPLE.findall(text)), int(float(slots.group(1)))


@dataclass
class Load:
    """Client threads sending GETs to the counted route, tallying outcomes."""

    port: int
    clients: int = 4
    acked: int = 0
    unknown: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def run(self, max_requests: int, max_seconds: float) -> None:
        deadline = time.monotonic() + max_seconds
        sent = 0
        conn: http.client.HTTPConnection | None = None
        while not self.stop.is_set() and sent < max_requests and time.monotonic() < deadline:
            sent += 1
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                conn.request("GET", ROUTE)
                resp = conn.getresponse()
                resp.read()
                ok = 200 <= resp.status < 300
            except (OSError, http.client.HTTPException):
                ok = False
                if conn is not None:
                    conn.close()
                conn = None
            with self.lock:
                if ok:
                    self.acked += 1
                else:
                    self.unknown += 1
        if conn is not None:
            conn.close()

    def start(self, max_requests: int = 20_000, max_seconds: float = 30) -> None:
        for _ in range(self.clients):
            t = threading.Thread(target=self.run, args=(max_requests, max_seconds))
            t.start()
            self.threads.append(t)

    def wait(self) -> None:
        """Until every client sent its share (or ran out of time)."""
        for t in self.threads:
            t.join(60)

    def join(self) -> None:
        """Stop the clients now."""
        self.stop.set()
        self.wait()


@dataclass
class Scraper:
    """Polls the host's /metrics; records every total it saw, in order."""

    port: int
    seen: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def run(self) -> None:
        deadline = time.monotonic() + 120
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                total, slots = host_total(self.port)
            except (OSError, http.client.HTTPException, AssertionError):
                continue  # a worker killed under the scrape: its answer is unknown
            self.seen.append(total)
            self.slots.append(slots)
            self.stop.wait(0.02)  # scrape interval

    def __enter__(self) -> Scraper:
        self.thread = threading.Thread(target=self.run)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.thread is not None
        self.thread.join(60)

    def check_never_backwards(self) -> None:
        assert self.seen, "the scraper never got an answer"
        drops = [(a, b) for a, b in zip(self.seen, self.seen[1:], strict=False) if b < a]
        assert not drops, f"a scrape saw the host total go back: {drops[:5]}"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    yield {
        **os.environ,
        "KEEPCOUNT_STORE": f"sqlite:///{tmp_path}/counters.db",
        "KEEPCOUNT_NODE": "web-1",
    }


def settle(port: int, acked: int, unknown: int) -> int:
    """The host total once the load stopped; it must lie in [acked, acked + unknown]."""
    total, _ = host_total(port)
    assert acked <= total <= acked + unknown, (acked, total, unknown)
    return total


def chaos(server: Server, load: Load, scraper: Scraper, kills: int, rng: random.Random) -> None:
    """SIGKILL a random worker ``kills`` times under load, each once a replacement serves."""
    for _ in range(kills):
        before = len(scraper.seen)
        deadline = time.monotonic() + 30
        while len(scraper.seen) < before + 5:  # some scrapes (and requests) between kills
            assert time.monotonic() < deadline, "no scrape answered"
            time.sleep(0.01)
        workers = server.workers()
        assert workers, "no workers"
        os.kill(rng.choice(workers), signal.SIGKILL)


CASES = {
    "gunicorn-sync": lambda p, w: gunicorn(
        p, w, "--max-requests", "300", "--max-requests-jitter", "50"
    ),
    "gunicorn-sync-preload": lambda p, w: gunicorn(p, w, "--preload", "--max-requests", "300"),
    "gunicorn-gthread": lambda p, w: gunicorn(p, w, "-k", "gthread", "--threads", "4"),
    "gunicorn-uvicorn-worker": lambda p, w: gunicorn(p, w, "--max-requests", "300", asgi=True),
    "gunicorn-uvicorn-worker-preload": lambda p, w: gunicorn(p, w, "--preload", asgi=True),
    "uvicorn-workers": uvicorn,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_workers_killed_and_recycled_lose_no_acknowledged_request(
    case: str, tmp_path: Path, env: dict[str, str]
) -> None:
    workers = 3
    port = free_port()
    server = Server(CASES[case](port, workers), port, env, tmp_path / "server.log")
    rng = random.Random(14)
    try:
        server.start()
        load = Load(port)
        with Scraper(port) as scraper:
            load.start(max_requests=1500, max_seconds=20)
            chaos(server, load, scraper, kills=3, rng=rng)
            load.wait()
            total = settle(port, load.acked, load.unknown)
        scraper.check_never_backwards()
        assert load.acked > 1000, (load.acked, load.unknown)
        assert max(scraper.slots) <= workers, scraper.slots

        # The whole server, master and workers, SIGKILLed and started again.
        server.kill_all()
        server.start()
        with Scraper(port) as again:
            more = Load(port)
            more.start(max_requests=100, max_seconds=20)
            more.wait()
        again.check_never_backwards()
        final = settle(port, load.acked + more.acked, load.unknown + more.unknown)
        assert final >= total + more.acked
        assert again.seen[0] >= total, (again.seen[0], total)
        assert max(again.slots) <= workers, again.slots
    finally:
        server.stop()


@pytest.mark.g5
def test_two_hosts_on_one_store_show_their_own_totals(tmp_path: Path, env: dict[str, str]) -> None:
    ports = [free_port(), free_port()]
    servers = [
        Server(gunicorn(port, 2), port, {**env, "KEEPCOUNT_NODE": host}, tmp_path / f"{host}.log")
        for port, host in zip(ports, ["web-1", "web-2"], strict=True)
    ]
    try:
        for s in servers:
            s.start()
            s.wait_slots(2)
        sent = {ports[0]: 40, ports[1]: 25}
        for port, n in sent.items():
            for _ in range(n):
                assert get(port, ROUTE)[0] == 200
        for port, n in sent.items():
            for _ in range(4):  # whichever worker answers, the same host total
                assert host_total(port) == (n, 2)
        store = open_store(env["KEEPCOUNT_STORE"])
        try:
            totals = cluster_totals(store.read_cluster("http_requests_total"))
        finally:
            store.close()
        (hit,) = [t for t in totals if t.labels["route"] == ROUTE]
        assert hit.value == 65
        # Each host's slots (which worker served how many requests is the server's choice).
        assert set(hit.nodes) <= {"web-1", "web-1@1", "web-2", "web-2@1"}
        assert {host_of(n) for n in hit.nodes} == {"web-1", "web-2"}
        assert sum(v for n, v in hit.nodes.items() if host_of(n) == "web-1") == 40
    finally:
        for s in servers:
            s.stop()


ASYNC_CASES = {
    "gunicorn-sync": lambda p, w: gunicorn(p, w, "--max-requests", "200"),
    "uvicorn-workers": uvicorn,
}


@pytest.mark.parametrize("case", sorted(ASYNC_CASES))
def test_bounded_async_graceful_stop_and_recycling_flush_everything(
    case: str, tmp_path: Path, env: dict[str, str]
) -> None:
    """Bounded-async mode answers before its counts are durable; workers
    recycled by ``--max-requests`` and a SIGTERM of the server flush and
    release their slots on the way out, so nothing answered is lost."""
    port = free_port()
    env = {**env, "WORKER_APP_DURABLE": "0"}
    server = Server(ASYNC_CASES[case](port, 2), port, env, tmp_path / "server.log")
    try:
        server.start()
        load = Load(port)
        load.start(max_requests=400, max_seconds=20)
        load.wait()
        assert load.unknown == 0 and load.acked == 1600
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)  # graceful: the workers exit cleanly
        assert server.proc.wait(30) == 0, server.log.read_text()[-3000:]
        store = open_store(env["KEEPCOUNT_STORE"])
        try:
            (hit,) = [
                t for t in cluster_totals(store.read_cluster("http_requests_total"))
                if t.labels["route"] == ROUTE
            ]  # fmt: skip
            records = {r.node: r for r in store.nodes()}
        finally:
            store.close()
        assert hit.value == load.acked  # every answered request, flushed at exit
        assert len(records) <= 2, records
        if case.startswith("gunicorn"):  # uvicorn ends its workers by a signal: no atexit
            assert all(r.released_at is not None for r in records.values()), records
    finally:
        server.stop()


def test_bounded_async_sigkill_loses_at_most_max_pending_per_worker(
    tmp_path: Path, env: dict[str, str]
) -> None:
    workers, max_pending = 2, 20
    port = free_port()
    env = {**env, "WORKER_APP_DURABLE": "0", "WORKER_APP_MAX_PENDING": str(max_pending)}
    server = Server(gunicorn(port, workers), port, env, tmp_path / "server.log")
    try:
        server.start()
        load = Load(port)
        with Scraper(port) as scraper:
            load.start(max_requests=5000, max_seconds=20)
            deadline = time.monotonic() + 30
            while load.acked < 2000:  # kill the server in the middle of the load
                assert time.monotonic() < deadline
                time.sleep(0.01)
            server.kill_all()
            load.join()
        server.start()
        total, _ = host_total(port)
        assert load.acked - workers * max_pending <= total <= load.acked + load.unknown, (
            load.acked, total, load.unknown,
        )  # fmt: skip
        assert total >= max(scraper.seen)  # what was shown before is still there
    finally:
        server.stop()
