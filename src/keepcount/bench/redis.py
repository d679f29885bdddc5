"""The Redis peer of ``durable``: a throwaway ``redis-server`` and ``redis-benchmark``.

Redis ``INCR`` with ``appendfsync always`` is the usual answer to "a durable
counter": every write is appended to the AOF and fsynced before the reply
(with group commit across clients in one event-loop pass).  The server is
started here on 127.0.0.1 with its data in a directory of ours, polled with
``redis-cli ping`` until it answers (with a deadline), and killed when done.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from keepcount.bench.result import BenchError
from keepcount.nodeproc import free_port
from keepcount.process import ManagedProcess, ProcessExited

__all__ = ["INSTALL_HINT", "RedisRun", "RedisServer", "require_tools"]

INSTALL_HINT = "run scripts/setup.sh (apt-get install redis-server redis-tools)"
_TOOLS = ("redis-server", "redis-cli", "redis-benchmark")
_START_TIMEOUT = 10.0
_START_ATTEMPTS = 3  # a free port can be taken between finding it and binding it


def require_tools() -> None:
    """Fail with the install command if a Redis program is missing."""
    for tool in _TOOLS:
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found: {INSTALL_HINT}")


def server_version() -> str:
    out = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    for word in out.split():
        if word.startswith("v="):
            return word[2:]
    return out.strip()


@dataclass(frozen=True, slots=True)
class RedisRun:
    """One ``redis-benchmark`` run as it reported it."""

    requests: int
    ops_per_s: float
    p50_ms: float
    p99_ms: float


class RedisServer(ManagedProcess):
    """A ``redis-server`` on 127.0.0.1 that fsyncs its AOF on every write.

    ``start()`` returns once ``PING`` answers; ``stop()`` kills the process
    (its data is thrown away).  Use it as a context manager.
    """

    kind = "redis-server"

    def __init__(self, datadir: Path) -> None:
        super().__init__("", datadir / "redis.log")
        self.datadir = datadir
        self.port = 0

    def start(self) -> None:
        try:
            for _ in range(_START_ATTEMPTS):
                self.port = free_port()
                self.spawn([
                    "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                    "--dir", str(self.datadir), "--save", "",
                    "--appendonly", "yes", "--appendfsync", "always",
                ])  # fmt: skip
                try:
                    self.wait_until(self._pong, _START_TIMEOUT, interval=0.02)
                    return
                except (ProcessExited, TimeoutError):
                    self.stop()  # exited: most likely the port was taken
        except BaseException:
            self.stop()  # never leave a server behind, even on Ctrl-C
            raise
        raise BenchError(f"redis-server did not start{self.log_tail()}")

    def _pong(self) -> bool:
        try:
            out = subprocess.run(
                ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), "ping"],
                capture_output=True,
                text=True,
                timeout=2,
                check=False,
            ).stdout
        except subprocess.TimeoutExpired:
            return False
        return out.strip() == "PONG"

    def benchmark(self, clients: int, requests: int, timeout: float) -> RedisRun:
        """Run ``redis-benchmark -t incr`` against this server (killed after ``timeout`` s)."""
        argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(self.port), "-t", "incr"]
        argv += ["-c", str(clients), "-n", str(requests), "-q", "--csv"]
        try:
            proc = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise BenchError(f"redis-benchmark ran longer than {timeout:.0f} s") from None
        if proc.returncode != 0:
            raise BenchError(f"redis-benchmark failed ({proc.returncode}): {proc.stderr.strip()}")
        return _parse(proc.stdout, requests)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _parse(out: str, requests: int) -> RedisRun:
    """Read the ``INCR`` row of ``redis-benchmark --csv``: rps, then latencies in ms."""
    rows = list(csv.DictReader(line for line in out.splitlines() if line.startswith('"')))
    for row in rows:
        if row.get("test") == "INCR":
            return RedisRun(
                requests,
                float(row["rps"]),
                float(row["p50_latency_ms"]),
                float(row["p99_latency_ms"]),
            )
    raise BenchError(f"no INCR result in redis-benchmark's output: {out!r}")
