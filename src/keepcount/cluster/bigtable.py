"""The Cloud Bigtable emulator as a child process: start, stop, kill.

Google's own emulator (``cloud.google.com/go/bigtable/cmd/emulator``, the
``cbtemulator`` of the Cloud SDK), built from source by
``scripts/get-bigtable-emulator.sh`` into keepcount's cache and started on
a loopback port, never as a system service.  It speaks the real Bigtable
data and table-admin APIs over plaintext gRPC and enforces the same request
rules (millisecond-aligned timestamps, conditional mutations, GC rules), but
it **keeps everything in memory**: a stopped or killed emulator has lost
every table.  So restore-after-crash tests kill keepcount nodes, never the
emulator, and nothing here restarts it with its data.

Every verb returns only after its effect is observed: ``start`` once the
emulator answers a gRPC call (not merely accepts TCP), ``stop`` / ``kill``
once the process is reaped.

Example::

    emulator = BigtableEmulator(tmp_path / "bigtable")
    emulator.start()
    url = emulator.url_for("counters")  # bigtable://keepcount/emulator/counters?emulator=127.0.0.1:P
    emulator.kill()

Not thread-safe: one owner (a test fixture) drives it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path
from typing import Self

from keepcount.cluster.processes import ServerProcess
from keepcount.nodeproc import free_port

__all__ = ["INSTALL_HINT", "BigtableEmulator", "emulator_binary"]

INSTALL_HINT = "scripts/get-bigtable-emulator.sh"
"""The command that installs the emulator where ``emulator_binary`` looks."""

BINARY_ENV = "KEEPCOUNT_BIGTABLE_EMULATOR"
CACHE_ENV = "KEEPCOUNT_CACHE"

PROJECT = "keepcount"
INSTANCE = "emulator"
"""The emulator accepts any project and instance; these name the URLs it hands out."""

_POLL = 0.05  # poll interval inside deadline loops, not a synchronisation sleep
_PROBE = "/google.bigtable.admin.v2.BigtableTableAdmin/ListTables"


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path.name))


def emulator_binary() -> str:
    """The emulator to run: ``$KEEPCOUNT_BIGTABLE_EMULATOR``, else the newest
    ``cbtemulator-v*`` that ``scripts/get-bigtable-emulator.sh`` put in
    ``${KEEPCOUNT_CACHE:-~/.cache/keepcount}/bin``, else ``cbtemulator`` on the
    PATH (the Cloud SDK's).  ``FileNotFoundError`` naming the install command."""
    explicit = os.environ.get(BINARY_ENV)
    if explicit:
        if os.access(explicit, os.X_OK):
            return explicit
        raise FileNotFoundError(
            f"${BINARY_ENV} names {explicit}, which is not an executable; "
            f"install the Bigtable emulator with: {INSTALL_HINT}"
        )
    base = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "keepcount") / "bin"
    found = sorted(
        (p for p in base.glob("cbtemulator-v*") if os.access(p, os.X_OK)),
        key=_version_key,
        reverse=True,
    )
    if found:
        return str(found[0])
    on_path = shutil.which("cbtemulator")
    if on_path is not None:
        return on_path
    raise FileNotFoundError(
        f"the Cloud Bigtable emulator is not installed (no {base}/cbtemulator-v*, no "
        f"cbtemulator on the PATH); install it with: {INSTALL_HINT}"
    )


class BigtableEmulator(ServerProcess):
    """One emulator process on ``127.0.0.1:port``; its log lives in ``directory``.

    ``port=None`` takes a free one now; it stays the same across ``start``
    calls, so URLs handed out before a restart still point here (though the
    restarted emulator is empty).
    """

    kind = "Bigtable emulator"

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        super().__init__("bigtable", self.directory / "emulator.log")
        self.port = port if port is not None else free_port()

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: what ``BIGTABLE_EMULATOR_HOST`` would hold."""
        return f"127.0.0.1:{self.port}"

    def url_for(self, table: str) -> str:
        """The keepcount store URL of ``table`` on this emulator."""
        return f"bigtable://{PROJECT}/{INSTANCE}/{table}?emulator={self.host}"

    def start(self, timeout: float = 30.0) -> Self:
        """Start the emulator and return once it answers a gRPC call."""
        binary = emulator_binary()
        if not self.running():
            self.spawn([binary, "-host", "127.0.0.1", "-port", str(self.port)])
        self.wait_ready(timeout)
        return self

    def answers(self, timeout: float = 1.0) -> bool:
        """True if a gRPC call gets an answer (any status but UNAVAILABLE or a
        deadline: even an error means the server is up and serving)."""
        import grpc  # type: ignore[import-untyped]

        with grpc.insecure_channel(self.host) as channel:
            call = channel.unary_unary(_PROBE)  # raw bytes in and out: no message types needed
            try:
                call(b"", timeout=timeout)
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else None
                return code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            return True

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until it answers a gRPC call; ``ProcessExited`` (a ``RuntimeError``)
        if it exits, ``TimeoutError`` if time runs out."""
        self.wait_until(lambda: self.answers(timeout=1.0), timeout, interval=_POLL)

    def stop(
        self, timeout: float = 10.0, *, graceful: bool = True, sig: int | None = signal.SIGINT
    ) -> int | None:
        """SIGINT (its clean shutdown), SIGKILL if it lingers; returns once reaped.
        Every table is gone afterwards (the emulator keeps data in memory only)."""
        return super().stop(timeout, graceful=graceful, sig=sig)

    def logs(self, chars: int = 3000) -> str:
        state = "running" if self.running() else "down"
        return f"--- Bigtable emulator ({self.host}, {state}) ---\n{self.log_text(chars)}"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
