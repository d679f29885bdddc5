"""One gunicorn serving the ``workers`` benchmark's app: start, ready, kill, stop.

``Server`` runs ``gunicorn -w N`` (sync or gthread workers) on the Flask app
of ``workers_app`` with one metrics backend, in a process group of its own,
so that ``kill_group`` SIGKILLs the master and every worker at once (the
crash check) and returns only once all of them are dead.  It is a
``keepcount.process.ManagedProcess``; its HTTP calls go through
``keepcount.httpclient.request`` (thread-safe, one connection per request,
as a fresh client would open).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from pathlib import Path

from keepcount import httpclient
from keepcount.bench.result import BenchError
from keepcount.nodeproc import free_port
from keepcount.process import ManagedProcess, ProcessExited, wait_exit

__all__ = ["BODY", "METRICS_PATH", "ROUTE", "THREADS", "Server"]

ROUTE = "/hello"
READY_ROUTE = "/ready"
METRICS_PATH = "/metrics"
THREADS = 8  # gthread's --threads
BODY = '{"n": 1}'
"""What every POST to ``ROUTE`` sends."""
_APP_MODULE = "kc_bench_app"  # the app's name in the work dir: not under keepcount.bench
_BOOT_TIMEOUT = 60.0
_STOP_TIMEOUT = 30.0
_READY_POLL = 0.02
"""Poll interval of ``/ready``, not synchronisation: the loop awaits it."""
_REQUEST_TIMEOUT = 30.0


class Server(ManagedProcess):
    """One gunicorn (a session and process group of its own) serving the app
    with one backend; ``what`` names it in messages."""

    kind = "gunicorn"

    def __init__(
        self, backend: str, worker_class: str, workers: int, work: Path, gunicorn: Path
    ) -> None:
        super().__init__(
            f"-w {workers} -k {worker_class} ({backend})", work / "gunicorn.log", new_session=True
        )
        self.backend = backend
        self.worker_class = worker_class
        self.workers = workers
        self.work = work
        self.gunicorn = gunicorn
        self.port = free_port()
        self.mp_dir = work / "multiproc"
        work.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(__file__).with_name("workers_app.py"), work / f"{_APP_MODULE}.py")
        conf = "" if backend != "multiprocess" else _CHILD_EXIT
        (work / "gunicorn.conf.py").write_text(conf)
        if backend == "multiprocess":
            self.mp_dir.mkdir(exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        threads = ["--threads", str(THREADS)] if self.worker_class == "gthread" else []
        return [
            str(self.gunicorn), "--workers", str(self.workers),
            "--worker-class", self.worker_class, *threads, "--chdir", str(self.work),
            "--bind", f"127.0.0.1:{self.port}", "--config", str(self.work / "gunicorn.conf.py"),
            "--pythonpath", str(self.work), "--error-logfile", str(self.log),
            "--log-level", "warning", *_no_control_socket(self.gunicorn), f"{_APP_MODULE}:app",
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        env["KEEPCOUNT_BENCH_BACKEND"] = self.backend
        if self.backend == "multiprocess":
            env["PROMETHEUS_MULTIPROC_DIR"] = str(self.mp_dir)
        env["PDC_SQLITE"] = str(self.work / "pdc.db")
        env["KEEPCOUNT_STORE"] = f"sqlite:///{self.work / 'keepcount.db'}"
        env["KEEPCOUNT_NODE"] = "web"
        return env

    def start(self) -> None:
        self.spawn(self.argv(), env=self.env())

    def wait_ready(self) -> None:
        """Poll ``/ready`` until it answers 200 (``BenchError`` if gunicorn
        exits first or it takes longer than the boot timeout)."""

        def ready() -> bool:
            try:
                return self.request("GET", READY_ROUTE, timeout=2)[0] == 200
            except OSError:
                return False  # not listening yet

        try:
            self.wait_until(ready, _BOOT_TIMEOUT, interval=_READY_POLL)
        except (ProcessExited, TimeoutError) as exc:
            raise BenchError(str(exc)) from None

    def request(
        self, method: str, path: str, timeout: float = _REQUEST_TIMEOUT
    ) -> tuple[int, bytes]:
        """One request (a POST sends ``BODY``): (status, body).  ``OSError``
        if the server did not answer (``keepcount.httpclient.request``: a
        connection of its own, as each crash-check request had)."""
        post = method == "POST"
        return httpclient.request(
            method, f"{self.url}{path}", body=BODY.encode() if post else None, timeout=timeout,
            headers={"Content-Type": "application/json"} if post else None,
        )  # fmt: skip

    def kill_group(self) -> None:
        """SIGKILL the master and every worker at once; return once all are dead."""
        members = _group_members(self.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.wait(_STOP_TIMEOUT)
        # The workers are reaped by init, not by us: wait for them to die.
        if not all(wait_exit(pid, _STOP_TIMEOUT) for pid in members):
            raise BenchError(f"{self.what}: processes {members} outlived SIGKILL")

    def stop(
        self, timeout: float = _STOP_TIMEOUT, *, graceful: bool = True, sig: int | None = None
    ) -> int | None:
        """SIGTERM (graceful: keepcount flushes and releases), SIGKILL the
        master if it outlives ``timeout``, then whatever is left of its group."""
        if self.proc is None:
            return None
        code = super().stop(timeout, graceful=graceful, sig=sig)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        return code


_CHILD_EXIT = '''"""gunicorn config: prometheus_client's multiprocess mode, as its docs say."""


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
'''


def _no_control_socket(gunicorn: Path, cache: dict[Path, list[str]] = {}) -> list[str]:  # noqa: B006
    """``--no-control-socket`` where gunicorn has one (25+): one shared path otherwise."""
    if gunicorn not in cache:
        out = subprocess.run(
            [str(gunicorn), "--help"], capture_output=True, text=True, timeout=60, check=False
        ).stdout
        cache[gunicorn] = ["--no-control-socket"] if "--no-control-socket" in out else []
    return cache[gunicorn]


def _group_members(pgid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
                pids.append(int(entry.name))
    return pids
