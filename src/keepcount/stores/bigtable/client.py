"""Connecting to Bigtable: the store URL, the client library's data and admin
clients (pointed at an emulator when the URL names one), gRPC's shutdown at
the last close, and client errors translated at the seam.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import tenacity

from keepcount.errors import (
    CorruptStore,
    InvalidInput,
    KeepcountError,
    OutcomeUnknown,
    StoreUnavailable,
)

__all__ = [
    "EMULATOR_ENV",
    "BigtableURL",
    "admin_client",
    "close_clients",
    "data_client",
    "library",
    "parse_url",
    "translate",
]

log = logging.getLogger("keepcount.stores.bigtable")

EMULATOR_ENV = "BIGTABLE_EMULATOR_HOST"
"""The Google client libraries' variable naming an emulator (``host:port``)."""


_PROJECT = re.compile(r"[a-z][a-z0-9.:-]{0,62}")  # also domain-scoped "example.com:proj"
_INSTANCE = re.compile(r"[a-z][a-z0-9-]{0,32}")
_TABLE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,49}")
_HOSTPORT = re.compile(r"[A-Za-z0-9.-]+:\d{1,5}|\[[0-9A-Fa-f:]+\]:\d{1,5}")
_INSTALL = "pip install 'keepcount[bigtable]'  (or: scripts/setup.sh)"
_ENV_LOCK = threading.Lock()  # the client library reads EMULATOR_ENV when built

GRPC_SHUTDOWN_WAIT = 2.0
"""Seconds ``close()`` of the process's last store waits at most for gRPC
to stop its threads (``_await_grpc_shutdown``)."""
_GRPC_THREADS = ("grpc", "event_engine", "lifeguard")  # names gRPC core gives its threads
_open_clients = 0  # data clients of this module open in the process (under _ENV_LOCK)


def _grpc_threads() -> list[str] | None:
    """The names of gRPC core's own threads in this process, or None where
    ``/proc`` cannot tell."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    names = []
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                name = f.read().strip()
        except OSError:  # that thread just ended
            continue
        if name.startswith(_GRPC_THREADS):
            names.append(name)
    return sorted(names)


def _await_grpc_shutdown(timeout: float = GRPC_SHUTDOWN_WAIT) -> None:
    """Wait until gRPC has stopped its threads after its last channel closed.

    gRPC shuts its core down on threads of its own, a few milliseconds after
    the last ``close()`` returned.  A ``fork()`` in that moment deadlocks:
    the parent in gRPC's own pre-fork handler, or the child on its first
    channel.  And the registry closes its store just before a fork, for the
    child to open one of its own (``keepcount.registry``).  Returns early
    when the threads stay up with no shutdown under way: another gRPC user
    in the process keeps the core running.
    """
    threads = _GrpcThreads()

    def gave_up(state: tenacity.RetryCallState) -> None:
        log.debug(
            "gRPC threads still running %.1f s after the last close: %s", timeout, threads.last
        )

    tenacity.Retrying(
        stop=tenacity.stop_after_delay(timeout),
        wait=tenacity.wait_fixed(0.001),
        retry=tenacity.retry_if_result(lambda settled: not settled),
        retry_error_callback=gave_up,
    )(threads.settled)


@dataclass
class _GrpcThreads:
    """gRPC core's threads as last seen, and since when they have not changed."""

    last: list[str] | None = None
    since: float = field(default_factory=time.monotonic)

    def settled(self) -> bool:
        """True once the threads are gone (or ``/proc`` cannot tell), or
        have stayed the same for 0.1 s with no shutdown under way."""
        names = _grpc_threads()
        if not names:
            return True
        now = time.monotonic()
        if names != self.last or "grpc_shutdown" in names:
            self.last, self.since = names, now
            return False
        return now - self.since >= 0.1  # steady: the core stays up for someone else


@dataclass(frozen=True)
class BigtableURL:
    """A parsed ``bigtable://project/instance/table[?options]``."""

    project: str
    instance: str
    table: str
    app_profile: str | None = None
    emulator: str | None = None
    """``host:port`` of a Bigtable emulator, or None for Cloud Bigtable."""


def parse_url(url: str) -> BigtableURL:
    """``bigtable://project/instance/table[?app_profile=ID&emulator=HOST:PORT]``;
    ``InvalidInput`` naming what is wrong."""
    parts = urlsplit(url)
    example = "e.g. bigtable://my-project/my-instance/counters"
    if parts.scheme != "bigtable":
        raise InvalidInput(f"not a Bigtable store URL: {url!r} ({example})")
    path = parts.path.strip("/").split("/") if parts.path.strip("/") else []
    if len(path) != 2 or not parts.netloc:
        raise InvalidInput(
            f"store URL {url!r} must name a project, an instance and a table ({example})"
        )
    project, (instance, table) = parts.netloc, path
    for what, value, pattern in (
        ("project id", project, _PROJECT),
        ("instance id", instance, _INSTANCE),
        ("table id", table, _TABLE),
    ):
        if not pattern.fullmatch(value):
            raise InvalidInput(f"store URL {url!r}: {value!r} is not a valid Bigtable {what}")
    options: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in ("app_profile", "emulator") or name in options:
            raise InvalidInput(
                f"store URL {url!r}: unknown or repeated option {name!r} "
                "(known: app_profile=ID, emulator=HOST:PORT)"
            )
        options[name] = value
    emulator = options.get("emulator")
    if emulator is not None and not _HOSTPORT.fullmatch(emulator):
        raise InvalidInput(f"store URL {url!r}: emulator must be HOST:PORT, not {emulator!r}")
    profile = options.get("app_profile")
    if profile is not None and not re.fullmatch(r"[_a-zA-Z0-9][-_.a-zA-Z0-9]{0,49}", profile):
        raise InvalidInput(f"store URL {url!r}: {profile!r} is not a valid app profile id")
    return BigtableURL(project, instance, table, profile, emulator)


def library() -> Any:
    """The client library's data package; ``InvalidInput`` naming the extra if missing."""
    try:
        import google.cloud.bigtable.data.mutations
        import google.cloud.bigtable.data.row_filters  # noqa: F401 - used as data.row_filters
        from google.cloud.bigtable import data
    except ImportError:  # pragma: no cover - depends on the installation
        raise InvalidInput(f"the Bigtable store needs google-cloud-bigtable: {_INSTALL}") from None
    return data


def data_client(data: Any, project: str, emulator: str | None) -> Any:
    """The library's data client, pointed at ``emulator`` if there is one;
    counted open until ``close_clients``.

    The library takes an emulator only from ``EMULATOR_ENV``, read when
    the client is built: it is set for that moment only (under a lock),
    so the URL decides, not whatever the process environment says."""
    global _open_clients
    with _ENV_LOCK, warnings.catch_warnings():
        # "Connecting to Bigtable emulator at ...": expected, not a problem.
        warnings.filterwarnings("ignore", "Connecting to Bigtable emulator", RuntimeWarning)
        saved = os.environ.get(EMULATOR_ENV)
        try:
            if emulator is not None:
                os.environ[EMULATOR_ENV] = emulator
            client = data.BigtableDataClient(project=project)
        finally:
            if saved is None:
                os.environ.pop(EMULATOR_ENV, None)
            else:
                os.environ[EMULATOR_ENV] = saved
        _open_clients += 1
    return client


def admin_client(emulator: str | None) -> Any:
    """The library's table admin client (of ``emulator`` if there is one)."""
    from google.cloud.bigtable_admin_v2 import BigtableTableAdminClient

    if emulator is None:
        return BigtableTableAdminClient()  # Application Default Credentials
    import grpc  # type: ignore[import-untyped]
    from google.cloud.bigtable_admin_v2.services.bigtable_table_admin.transports import (
        BigtableTableAdminGrpcTransport,
    )

    channel = grpc.insecure_channel(emulator)
    return BigtableTableAdminClient(transport=BigtableTableAdminGrpcTransport(channel=channel))


def close_clients(where: str, client: Any, admin: Any) -> None:
    """Close a ``data_client`` and its admin client (None: none made); after
    the process's last one, wait for gRPC to stop (the process may fork next:
    ``keepcount.registry``).  Never raises: it runs on error paths too."""
    global _open_clients
    try:
        client.close()
    except Exception as exc:  # closing must not fail the caller's own error path
        log.debug("%s: closing the data client: %r", where, exc)
    if admin is not None:
        try:
            admin.transport.close()
        except Exception as exc:
            log.debug("%s: closing the admin client: %r", where, exc)
    with _ENV_LOCK:
        _open_clients -= 1
        last = _open_clients == 0
    if last:
        _await_grpc_shutdown()


def translate(exc: BaseException, context: str, *, write: bool = False) -> KeepcountError:
    """Client library and gRPC errors -> keepcount errors (translated at the seam)."""
    if isinstance(exc, KeepcountError):
        return exc
    from google.api_core import exceptions as gexc

    name = type(exc).__name__
    text = str(exc)
    if isinstance(exc, gexc.NotFound):
        return CorruptStore(
            f"{context}: the table or one of keepcount's column families is missing ({exc}); "
            "keepcount refuses to start from zero"
        )
    if isinstance(exc, gexc.PermissionDenied | gexc.Unauthenticated):
        return StoreUnavailable(
            f"{context}: not permitted ({exc}); check the credentials the environment "
            "provides (GOOGLE_APPLICATION_CREDENTIALS, the VM's service account)"
        )
    if isinstance(exc, gexc.InvalidArgument | gexc.FailedPrecondition | gexc.ResourceExhausted):
        return StoreUnavailable(f"{context}: Bigtable refused it: {name} ({exc})")
    if write and not _never_sent(text):
        return OutcomeUnknown(f"{context}: {name} ({exc}); outcome unknown, not acknowledged")
    return StoreUnavailable(f"{context}: {name} ({exc})")


def _never_sent(text: str) -> bool:
    """gRPC's words for a call that never reached a server (no connection)."""
    text = text.lower()
    return (
        "failed to connect" in text
        or "connection refused" in text
        or "dns resolution failed" in text
    )
