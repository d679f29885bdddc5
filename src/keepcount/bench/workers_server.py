"""One gunicorn serving the ``workers`` benchmark's app: start, ready, kill, stop.

``Server`` runs ``gunicorn -w N`` (sync or gthread workers) on the Flask app
of ``workers_app`` with one metrics backend, in a process group of its own,
so that ``kill_group`` SIGKILLs the master and every worker at once (the
crash check) and returns only once all of them are dead.  Its HTTP calls go
through ``keepcount.httpclient.request`` (thread-safe, one connection per
request, as a fresh client would open); waits are ``tenacity`` polls.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    retry_if_result,
    stop_after_delay,
    wait_fixed,
)

from keepcount import httpclient
from keepcount.bench.result import BenchError
from keepcount.nodeproc import free_port

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
_DEAD_POLL = 0.01
_REQUEST_TIMEOUT = 30.0


def _until(check: Callable[[], bool], seconds: float, every: float) -> bool:
    """``check()`` every ``every`` s until it is true (True) or ``seconds``
    passed (False); no answer (an ``OSError``) counts as not yet."""
    retrying = Retrying(
        retry=retry_if_result(lambda done: not done) | retry_if_exception_type(OSError),
        wait=wait_fixed(every),
        stop=stop_after_delay(seconds),
    )
    try:
        return bool(retrying(check))
    except RetryError:
        return False


class Server:
    """One gunicorn (its own process group) serving the app with one backend."""

    def __init__(
        self, backend: str, worker_class: str, workers: int, work: Path, gunicorn: Path
    ) -> None:
        self.backend = backend
        self.worker_class = worker_class
        self.workers = workers
        self.work = work
        self.gunicorn = gunicorn
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = work / "gunicorn.log"
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
            "--worker-class", self.worker_class, *threads,
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
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(),
                cwd=self.work,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: one killpg takes every worker
            )

    def wait_ready(self) -> None:
        """Poll ``/ready`` until it answers 200."""
        proc = self.proc
        assert proc is not None

        def ready() -> bool:
            code = proc.poll()
            if code is not None:
                raise BenchError(f"{self.name} exited with {code} while booting{self.log_tail()}")
            return self.request("GET", READY_ROUTE, timeout=2)[0] == 200

        if not _until(ready, _BOOT_TIMEOUT, _READY_POLL):
            raise BenchError(f"{self.name} not ready within {_BOOT_TIMEOUT} s{self.log_tail()}")

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

    @property
    def name(self) -> str:
        return f"gunicorn -w {self.workers} -k {self.worker_class} ({self.backend})"

    def log_tail(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"\n--- {self.log} ---\n{text[-3000:]}" if text else ""

    def kill_group(self) -> None:
        """SIGKILL the master and every worker at once; return once all are dead."""
        assert self.proc is not None
        pgid = self.proc.pid
        members = _group_members(pgid)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(_STOP_TIMEOUT)
        # The workers are reaped by init, not by us: wait for them to die.
        if not _until(lambda: not any(map(_alive, members)), _STOP_TIMEOUT, _DEAD_POLL):
            raise BenchError(f"{self.name}: processes {members} outlived SIGKILL")

    def stop(self) -> None:
        """SIGTERM (graceful: keepcount flushes and releases), SIGKILL what is left."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(_STOP_TIMEOUT)


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


def _alive(pid: int) -> bool:
    """Running (a zombie has closed its files and released its locks: not alive)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
